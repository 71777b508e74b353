"""`LabelledImages`, what every loader returns: uint8 images in channel-first layout and labels."""

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np
from jaxtyping import Int64, UInt8

from .download import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledImages:
    """A labelled image dataset held in memory.

    Images stay uint8 (a quarter of the memory of float32); the set sampler converts the few it
    draws to float32 in [-1, 1].
    """

    images: UInt8[np.ndarray, "n c h w"]
    """Pixels 0..255, channel first."""
    labels: Int64[np.ndarray, " n"]
    """Class index of each image, an index into `class_names`."""
    class_names: tuple[str, ...]
    """Name of each class."""

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"LabelledImages has {self.images.shape[0]} images but {self.labels.shape[0]} "
                "labels; give one label per image."
            )
        if self.labels.size and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)
        ):
            raise ValueError(
                f"LabelledImages labels lie in [{int(self.labels.min())}, "
                f"{int(self.labels.max())}] but there are {len(self.class_names)} class names; "
                "give one name per class."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_npz(path: Path, keys: tuple[str, ...], *, fix: str) -> dict[str, np.ndarray]:
    """Read the named arrays of an ``.npz`` without unpickling anything.

    **Arguments:**

    - `path`: the ``.npz`` file.
    - `keys`: the arrays it must hold.
    - `fix`: the end of the error sentence, saying what to do.

    **Returns:**

    A dict from each key to its array.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(missing)} (it has "
                    f"{', '.join(npz.files) or 'none'}); {fix}"
                )
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path} is not a readable .npz ({e}); {fix}") from None


def find_file(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` that exists in `data_dir`, or None."""
    for name in names:
        if (data_dir / name).exists():
            return data_dir / name
    return None


def as_path(path: str | os.PathLike[str]) -> Path:
    """A user-given path with ``~`` expanded."""
    return Path(path).expanduser()
