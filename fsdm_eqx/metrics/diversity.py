"""Sample diversity: how far apart the images generated from one support set are."""

import numpy as np
from jaxtyping import Float

__all__ = ["mean_pairwise_distance"]


def mean_pairwise_distance(features: Float[np.ndarray, "s k d"]) -> float:
    """The mean Euclidean distance between two distinct members of a group, averaged over the
    ``s`` groups of ``k >= 2`` feature vectors each (e.g. the images generated from one support
    set, or the set's real images), in float64.

    A generator that ignores its noise scores 0; real images of one class give the figure to
    compare with.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(
            f"features must have shape (groups, k >= 2, d); got {x.shape}: a group needs two "
            "members for a pairwise distance."
        )
    k = x.shape[1]
    squared = np.sum(x * x, axis=-1)
    gram = np.einsum("skd,sld->skl", x, x)
    d2 = squared[:, :, None] + squared[:, None, :] - 2.0 * gram
    distances = np.sqrt(np.maximum(d2, 0.0))
    distances[:, np.arange(k), np.arange(k)] = 0.0
    return float(np.mean(distances.sum(axis=(1, 2)) / (k * (k - 1))))
