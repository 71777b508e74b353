"""CIFAR-100 (Krizhevsky 2009): the official archive, or a folder or ``.npz`` given as --data-dir.

The official train (50,000) and test (10,000) images are merged: the few-shot protocol splits by
class, never by the official train/test membership. The pickles in the archive are read by an
unpickler that refuses every global except numpy's array reconstruction, so a tampered archive
cannot run code.
"""

import codecs
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import LabelledImages, as_path, find_file, load_npz
from .download import DataError, check_file, default_cache_dir, fetch

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
"""The 20 CIFAR-100 superclasses (official ``coarse_label_names`` order) and their 5 classes each,
as in the table of the CIFAR web page."""

FINE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(n for v in SUPERCLASSES.values() for n in v))
"""The 100 official ``fine_label_names``, in label order (alphabetical)."""

COARSE_LABEL_NAMES: tuple[str, ...] = tuple(SUPERCLASSES)
"""The 20 official ``coarse_label_names``, in label order (alphabetical)."""

FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": (
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
"""The FC100 split (Oreshkin et al. 2018, "TADAM"), 12/4/4 superclasses, i.e. 60/20/20 classes.

Pinned to torchmeta's assets, which the FSDM reference preprocessing reads through
``fc100/{train,val,test}_labels.json``: github.com/tristandeleu/pytorch-meta,
``torchmeta/datasets/assets/cifar100/fc100/train.json`` and ``.../fc100/test.json`` (commit
4c5eb5b46a51050d5a1427d56f90b07785402e8f) and the validation list
``torchmeta/datasets/assets/cifar100/val.json`` (commit 3e29bfaf764c2f65ec60cf8bdcd5db5d8a6976d7),
which holds exactly the 4 superclasses left over by the other two."""


def superclass_of(fine_name: str) -> str:
    """The CIFAR-100 superclass of a fine class name."""
    for coarse, fines in SUPERCLASSES.items():
        if fine_name in fines:
            return coarse
    raise ValueError(f"{fine_name!r} is not a CIFAR-100 class name; see FINE_LABEL_NAMES.")


def fc100_classes(split: str) -> tuple[str, ...]:
    """The 60 (train) or 20 (val, test) fine class names of an FC100 split, sorted."""
    if split not in FC100_SUPERCLASSES:
        raise ValueError(f"FC100 split {split!r} does not exist; choose 'train', 'val' or 'test'.")
    return tuple(sorted(f for c in FC100_SUPERCLASSES[split] for f in SUPERCLASSES[c]))


_RECONSTRUCT: Any = np.ndarray((0,)).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"the global {module}.{name} is not allowed") from None


def safe_unpickle(data: bytes) -> Any:
    """Unpickle `data`, allowing no globals but numpy's array reconstruction (and the
    ``codecs.encode`` that Python 3 writes for bytes in protocol 2).

    Byte strings of Python 2 pickles (the CIFAR files) stay ``bytes``.
    """
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()


def _key(d: dict[Any, Any], name: str) -> Any:
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


def _decode(names: list[Any]) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _parse_pickles(files: dict[str, bytes], source: Path, fix: str) -> LabelledImages:
    """Build the merged dataset from the bytes of the ``train``, ``test`` and ``meta`` pickles."""
    try:
        meta = safe_unpickle(files["meta"])
        fine_names = _decode(_key(meta, "fine_label_names"))
        coarse_names = _decode(_key(meta, "coarse_label_names"))
        images: list[np.ndarray] = []
        fine: list[np.ndarray] = []
        coarse: list[np.ndarray] = []
        for part in ("train", "test"):
            d = safe_unpickle(files[part])
            data = np.asarray(_key(d, "data"), dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            fine.append(np.asarray(_key(d, "fine_labels"), dtype=np.int64))
            coarse.append(np.asarray(_key(d, "coarse_labels"), dtype=np.int64))
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, IndexError) as e:
        raise DataError(f"{source} holds unreadable CIFAR-100 pickles ({e}); {fix}") from None
    if fine_names != FINE_LABEL_NAMES or coarse_names != COARSE_LABEL_NAMES:
        raise DataError(f"{source} does not list the official CIFAR-100 class names; {fix}")
    labels = np.concatenate(fine)
    coarse_labels = np.concatenate(coarse)
    expected_coarse = np.array([COARSE_LABEL_NAMES.index(superclass_of(n)) for n in fine_names])
    if labels.shape != coarse_labels.shape or not np.array_equal(
        expected_coarse[labels], coarse_labels
    ):
        raise DataError(f"{source} pairs fine and coarse labels differently from CIFAR-100; {fix}")
    return LabelledImages(np.concatenate(images), labels, fine_names)


def _read_archive(path: Path, fix: str) -> LabelledImages:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for part in ("train", "test", "meta"):
                member = tar.extractfile(f"{FOLDER}/{part}")
                if member is None:
                    raise KeyError(f"{FOLDER}/{part}")
                files[part] = member.read()
    except KeyError as e:
        raise DataError(f"{path} lacks the member {e}; {fix}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); {fix}") from None
    return _parse_pickles(files, path, fix)


def _read_folder(folder: Path, fix: str) -> LabelledImages:
    files: dict[str, bytes] = {}
    for part in ("train", "test", "meta"):
        try:
            files[part] = (folder / part).read_bytes()
        except OSError:
            raise DataError(f"{folder / part} is missing; {fix}") from None
    return _parse_pickles(files, folder, fix)


def _read_npz(path: Path, fix: str) -> LabelledImages:
    arrays = load_npz(path, ("images", "fine_labels", "fine_label_names"), fix=fix)
    images, labels, names = arrays["images"], arrays["fine_labels"], arrays["fine_label_names"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{path} holds images of dtype {images.dtype} and shape {images.shape}, not uint8 "
            f"(n, 32, 32, 3); {fix}"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} holds {labels.shape} labels for {len(images)} images; {fix}")
    if tuple(str(n) for n in names) != FINE_LABEL_NAMES:
        raise DataError(f"{path} does not list the 100 official CIFAR-100 class names; {fix}")
    return LabelledImages(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        labels.astype(np.int64),
        FINE_LABEL_NAMES,
    )


def load_cifar100(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> LabelledImages:
    """Load CIFAR-100, official train and test images merged (train first).

    **Arguments:**

    - `data_dir`: an ``.npz`` file (``images`` uint8 NHWC, ``fine_labels``, ``fine_label_names``),
        or a folder holding ``cifar-100-python.tar.gz``, the extracted ``cifar-100-python/``
        folder, or one ``.npz``; or the extracted folder itself. When None, the official archive
        is read from the cache, downloaded there first if needed.
    - `cache_dir`: the download cache (default ``$FSDM_EQX_CACHE`` or ``~/.cache/fsdm_eqx``).
    - `download`: whether a missing archive may be downloaded.

    **Returns:**

    `LabelledImages` with images (n, 3, 32, 32) uint8, fine labels 0..99 and the official fine
    label names. The superclass of each class is `superclass_of(name)`.
    """
    if data_dir is None:
        fix = f"delete it and run again to download a fresh copy of {URL}."
        if download:
            path = fetch([URL], ARCHIVE, ("md5", MD5), cache_dir=cache_dir)
        else:
            path = default_cache_dir(cache_dir) / ARCHIVE
            if not path.is_file():
                raise DataError(
                    f"{path} is missing and downloads are off; allow downloads or pass "
                    f"--data-dir with {ARCHIVE} in it."
                )
            check_file(path, ("md5", MD5), fix=fix)
        return _read_archive(path, fix)
    root = as_path(data_dir)
    fix = f"replace it with a good copy (the official archive is {URL}) or pass another --data-dir."
    if root.is_file():
        if root.suffix == ".npz":
            return _read_npz(root, fix)
        if root.name.endswith(".tar.gz"):
            check_file(root, ("md5", MD5), fix=fix)
            return _read_archive(root, fix)
        raise DataError(f"{root} is neither an .npz nor {ARCHIVE}; pass one of those.")
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist; pass a folder that holds {ARCHIVE}.")
    found = find_file(root, (ARCHIVE, FOLDER))
    if found is not None and found.name == ARCHIVE:
        check_file(found, ("md5", MD5), fix=fix)
        return _read_archive(found, fix)
    if found is not None:
        return _read_folder(found, fix)
    if all((root / p).is_file() for p in ("train", "test", "meta")):
        return _read_folder(root, fix)
    npzs = sorted(root.glob("*.npz"))
    if len(npzs) == 1:
        return _read_npz(npzs[0], fix)
    raise DataError(
        f"--data-dir {root} holds neither {ARCHIVE}, {FOLDER}/ nor exactly one .npz; put one of "
        f"them there (the archive is at {URL})."
    )
