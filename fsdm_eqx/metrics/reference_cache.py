"""Features of real images, computed once and reused: the reference statistics of FID and KID.

The few-shot protocol compares generated images with the real images of the same support sets,
which are a fixed function of the split, the seed and the counts. Their Inception features (and
their mean and covariance) are saved as ``<tag>-<n>-<digest>.npz`` under a cache directory,
keyed by the extractor (its name and a digest of its weights), the images' shape and their
exact pixels: a changed split, seed, count or weights file names another file, and a damaged
file is recomputed.
"""

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jaxtyping import Float, PyTree, UInt8

from .fid import FeatureStatistics, feature_statistics

__all__ = ["FeatureCache", "ReferenceStatistics", "tree_digest"]


@dataclasses.dataclass(frozen=True)
class ReferenceStatistics:
    """The features of a batch of real images (float64) and their mean and covariance."""

    features: Float[np.ndarray, "n d"]
    stats: FeatureStatistics


def tree_digest(tree: PyTree) -> str:
    """A SHA-256 of the array leaves of ``tree`` (dtype, shape and bytes), e.g. of the weights
    of a feature extractor, independent of the file they were read from."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array)):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _read(path: pathlib.Path) -> ReferenceStatistics | None:
    """The statistics saved at ``path``, or None when the file is missing or damaged."""
    try:
        with np.load(path) as stored:
            stats = FeatureStatistics(mu=stored["mu"], sigma=stored["sigma"])
            return ReferenceStatistics(stored["features"], stats)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """Reference statistics of real images under ``directory`` for one feature extractor.

    **Arguments:**
    - `directory`: where the files go (e.g. next to the dataset cache); created when needed.
    - `extractor`: the extractor's identity, its name and weights digest (`tree_digest`).
    - `tag`: a readable prefix of the file names, e.g. ``"cifar100-test"``.
    """

    directory: pathlib.Path
    extractor: str
    tag: str = "reference"

    def path_for(self, images: UInt8[np.ndarray, "n c h w"]) -> pathlib.Path:
        """The file that holds the statistics of exactly these ``images``."""
        digest = hashlib.sha256()
        digest.update(self.extractor.encode())
        digest.update(f"{images.dtype}{images.shape}".encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        return self.directory / f"{self.tag}-{images.shape[0]}-{digest.hexdigest()[:20]}.npz"

    def statistics(
        self,
        images: UInt8[np.ndarray, "n c h w"],
        compute: Callable[[UInt8[np.ndarray, "n c h w"]], Float[np.ndarray, "n d"]],
    ) -> ReferenceStatistics:
        """The statistics of ``images``, read from the cache or computed with ``compute``
        (features of a batch of uint8 images) and saved atomically.

        In a multi-process run every process computes unless every process read the file
        (``compute`` may be collective), and process 0 alone saves it."""
        path = self.path_for(images)
        cached = _read(path)
        if jax.process_count() > 1:
            found = multihost_utils.process_allgather(np.asarray(cached is not None))
            cached = cached if bool(np.all(found)) else None
        if cached is not None:
            return cached
        features = np.asarray(compute(images), dtype=np.float64)
        stats = feature_statistics(features)
        if jax.process_index() != 0:
            return ReferenceStatistics(features, stats)
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".npz", delete=False) as f:
            np.savez(f, features=features, mu=stats.mu, sigma=stats.sigma)
        os.replace(f.name, path)
        return ReferenceStatistics(features, stats)
