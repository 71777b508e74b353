"""MNIST (LeCun et al. 1998): the official IDX files, or an ``.npz`` given as --data-dir.

Each IDX file is checked twice: the downloaded ``.gz`` against the official archive md5, and the
decompressed payload against the official payload md5, so a re-compressed copy in --data-dir is
accepted when, and only when, its bytes are the official ones.
"""

import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from .dataset import LabelledImages, as_path, load_npz
from .download import DataError, fetch

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

FILES: dict[str, tuple[str, str, int]] = {
    "train-images-idx3-ubyte": (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb", 2051
    ),
    "train-labels-idx1-ubyte": (
        "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624", 2049
    ),
    "t10k-images-idx3-ubyte": (
        "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea", 2051
    ),
    "t10k-labels-idx1-ubyte": (
        "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637", 2049
    ),
}  # fmt: skip
"""name -> (md5 of the official ``.gz``, md5 of the decompressed file, IDX magic number)."""

PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = tuple(str(d) for d in range(10))

MnistSplit = Literal["train", "test", "all"]


def parse_idx(payload: bytes, magic: int, source: Path, fix: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 2049 labels, 2051 images) into an array."""
    if len(payload) < 8 or int.from_bytes(payload[:4], "big") != magic:
        raise DataError(f"{source} is not an IDX file with magic number {magic}; {fix}")
    ndim = payload[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(payload) != header + int(np.prod(shape)):
        raise DataError(
            f"{source} holds {len(payload) - header} bytes of data, not the {int(np.prod(shape))} "
            f"its header announces, so it is truncated or corrupt; {fix}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx(path: Path, name: str, fix: str) -> np.ndarray:
    _, payload_md5, magic = FILES[name]
    try:
        raw = path.read_bytes()
        payload = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); {fix}") from None
    actual = hashlib.md5(payload).hexdigest()
    if actual != payload_md5:
        raise DataError(
            f"{path} decompresses to md5 {actual}, not the official {payload_md5}, so it is "
            f"truncated, corrupt or a different file; {fix}"
        )
    return parse_idx(payload, magic, path, fix)


def _load_part(
    part: str, data_dir: Path | None, cache_dir: str | os.PathLike[str] | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    arrays: list[np.ndarray] = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{PREFIX[part]}-{kind}"
        if data_dir is not None:
            fix = (
                f"replace it with the official {name}.gz ({MIRRORS[0]}) or pass another --data-dir."
            )
            path = next(
                (data_dir / n for n in (f"{name}.gz", name) if (data_dir / n).is_file()), None
            )
            if path is None:
                raise DataError(
                    f"--data-dir {data_dir} lacks {name}.gz; put the official MNIST files there "
                    f"(from {MIRRORS[0]}) or an .npz with images and labels."
                )
        else:
            fix = "delete it from the cache and run again to download a fresh copy."
            if not download:
                raise DataError(
                    f"MNIST {name}.gz is not given and downloads are off; allow downloads or pass "
                    "--data-dir with the official files in it."
                )
            path = fetch(
                [m + f"{name}.gz" for m in MIRRORS], f"{name}.gz", ("md5", FILES[name][0]),
                cache_dir=cache_dir,
            )  # fmt: skip
        arrays.append(_read_idx(path, name, fix))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"MNIST {part} has {images.shape[0]} images but {labels.shape[0]} labels.")
    return images, labels


def load_mnist(
    split: MnistSplit = "all",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> LabelledImages:
    """Load MNIST.

    **Arguments:**

    - `split`: ``"train"`` (60,000), ``"test"`` (10,000) or ``"all"`` (both, train first).
        Ignored for an ``.npz``, which is read whole.
    - `data_dir`: an ``.npz`` (``images`` uint8 (n, 28, 28), ``labels``), or a folder holding the
        official IDX files (``.gz`` or decompressed) or one ``.npz``. When None, the official
        files are read from the cache, downloaded there first if needed.
    - `cache_dir`: the download cache (default ``$FSDM_EQX_CACHE`` or ``~/.cache/fsdm_eqx``).
    - `download`: whether missing files may be downloaded.

    **Returns:**

    `LabelledImages` with images (n, 1, 28, 28) uint8, labels 0..9 and class names "0".."9".
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"MNIST split {split!r} does not exist; choose 'train', 'test' or 'all'.")
    root = None if data_dir is None else as_path(data_dir)
    if root is not None and not root.exists():
        raise DataError(f"--data-dir {root} does not exist; pass the folder of the MNIST files.")
    npz = None
    if root is not None:
        if root.is_file():
            npz = root
        elif not any(root.glob("*-ubyte*")):
            found = sorted(root.glob("*.npz"))
            npz = found[0] if len(found) == 1 else None
    if npz is not None:
        fix = "replace it or pass another --data-dir."
        arrays = load_npz(npz, ("images", "labels"), fix=fix)
        images, labels = arrays["images"], arrays["labels"]
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or len(labels) != len(images):
            raise DataError(
                f"{npz} holds images {images.dtype} {images.shape} and {len(labels)} labels, not "
                f"uint8 (n, 28, 28) with one label each; {fix}"
            )
        return LabelledImages(images[:, None].copy(), labels.astype(np.int64), CLASS_NAMES)
    parts = ("train", "test") if split == "all" else (split,)
    loaded = [_load_part(p, root, cache_dir, download) for p in parts]
    images = np.concatenate([im for im, _ in loaded])[:, None]
    labels = np.concatenate([lb for _, lb in loaded]).astype(np.int64)
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"MNIST labels go up to {int(labels.max())}; the files are not MNIST.")
    return LabelledImages(np.ascontiguousarray(images), labels, CLASS_NAMES)
