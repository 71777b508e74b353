"""Omniglot (Lake et al. 2015): the official zips of github.com/brendenlake/omniglot.

``images_background`` (964 characters of 30 alphabets) are the training classes and
``images_evaluation`` (659 characters of 20 alphabets) the test classes, 20 drawings each. The
105x105 binary drawings are inverted (white strokes on black, as torchmeta stores them) and
resized with PIL's box filter (an area average, as the FSDM reference preprocessing does) to 28x28
or 32x32.
"""

import dataclasses
import io
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Int64, UInt8
from PIL import Image, ImageOps, UnidentifiedImageError

from .dataset import LabelledImages, as_path
from .download import DataError, check_file, fetch

BASE_URLS = (
    "https://github.com/brendenlake/omniglot/raw/master/python/",
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/",
)

CHECKSUMS: dict[str, tuple[str, str]] = {
    "background": ("md5", "68d2efa1b9178cc56df9314c21c6e718"),
    "evaluation": ("md5", "6b91aef0f799c5bb55b94e3f2daec811"),
    "background_small1": (
        "sha256",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    ),
    "background_small2": (
        "sha256",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
    ),
}
"""Checksums of ``images_<subset>.zip``; the md5s are those torchvision and torchmeta check."""

RUNS_ZIP = "all_runs.zip"
RUNS_CHECKSUM = ("sha256", "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325")

OmniglotSubset = Literal["background", "evaluation", "background_small1", "background_small2"]
IMAGE_SIZES = (28, 32)


def _to_array(data: bytes, image_size: int) -> np.ndarray:
    """Decode one drawing: grey, inverted, box-filtered to `image_size` square."""
    with Image.open(io.BytesIO(data)) as img:
        grey = ImageOps.invert(img.convert("L"))
    resized = grey.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.uint8)


def _zip_path(
    subset: str,
    data_dir: Path | None,
    cache_dir: str | os.PathLike[str] | None,
    download: bool,
    checksum: tuple[str, str],
) -> tuple[Path, str]:
    name = f"images_{subset}.zip" if subset != "runs" else RUNS_ZIP
    if data_dir is not None:
        path = data_dir / name if data_dir.is_dir() else data_dir
        fix = f"replace it with the official {name} ({BASE_URLS[0]}) or pass another --data-dir."
        if not path.is_file():
            raise DataError(
                f"{path} is missing; put the official {name} (from {BASE_URLS[0]}) in --data-dir."
            )
        check_file(path, checksum, fix=fix)
        return path, fix
    if not download:
        raise DataError(
            f"Omniglot {name} is not given and downloads are off; allow downloads or pass "
            "--data-dir with the official zips in it."
        )
    path = fetch([u + name for u in BASE_URLS], name, checksum, cache_dir=cache_dir)
    return path, "delete it from the cache and run again to download a fresh copy."


def _read_zip(path: Path, fix: str) -> dict[str, bytes]:
    """The PNG files of a zip, by their path inside it."""
    try:
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in sorted(z.namelist()) if n.endswith(".png")}
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); {fix}") from None


def _decode(data: bytes, name: str, path: Path, fix: str, image_size: int) -> np.ndarray:
    try:
        return _to_array(data, image_size)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path} holds an unreadable image {name} ({e}); {fix}") from None


def load_omniglot(
    subsets: Sequence[OmniglotSubset] = ("background", "evaluation"),
    *,
    image_size: int = 28,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> LabelledImages:
    """Load Omniglot characters as classes.

    **Arguments:**

    - `subsets`: which official zips ``images_<subset>.zip`` to read and merge, in order.
    - `image_size`: 28 or 32.
    - `data_dir`: a folder holding the zips (or, for one subset, the zip itself). When None, they
        are read from the cache, downloaded there first if needed.
    - `cache_dir`: the download cache (default ``$FSDM_EQX_CACHE`` or ``~/.cache/fsdm_eqx``).
    - `download`: whether missing zips may be downloaded.

    **Returns:**

    `LabelledImages` with images (n, 1, s, s) uint8 (strokes bright) and one class per character,
    named ``"<subset>/<alphabet>/<character>"``, in sorted order within each subset.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"Omniglot image_size={image_size} is not allowed; choose 28 or 32.")
    root = None if data_dir is None else as_path(data_dir)
    if root is not None and root.is_file() and len(subsets) != 1:
        raise ValueError(
            f"--data-dir {root} is one zip but {len(subsets)} subsets were asked for; pass the "
            "folder that holds the zips."
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    for subset in subsets:
        if subset not in CHECKSUMS:
            raise ValueError(
                f"Omniglot subset {subset!r} does not exist; choose from {', '.join(CHECKSUMS)}."
            )
        path, fix = _zip_path(subset, root, cache_dir, download, CHECKSUMS[subset])
        files = _read_zip(path, fix)
        if not files:
            raise DataError(f"{path} holds no PNG drawings; {fix}")
        index: dict[str, int] = {}
        for member, data in files.items():
            parts = member.split("/")
            if len(parts) < 3:
                raise DataError(
                    f"{path} holds {member} outside an alphabet/character folder; {fix}"
                )
            key = f"{subset}/{parts[-3]}/{parts[-2]}"
            if key not in index:
                index[key] = len(names)
                names.append(key)
            images.append(_decode(data, member, path, fix, image_size))
            labels.append(index[key])
    return LabelledImages(
        np.stack(images)[:, None], np.asarray(labels, dtype=np.int64), tuple(names)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class OneShotRun:
    """One of the 20 official 20-way one-shot classification runs."""

    training: UInt8[np.ndarray, "20 1 s s"]
    """One drawing of each of the 20 characters (``training/classNN.png``)."""
    test: UInt8[np.ndarray, "20 1 s s"]
    """A second drawing of each character, by another drawer (``test/itemNN.png``)."""
    answers: Int64[np.ndarray, " 20"]
    """For each test drawing, the index of the training drawing of the same character."""


def load_omniglot_runs(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> tuple[OneShotRun, ...]:
    """Load the 20 official one-shot runs of ``all_runs.zip``, preprocessed as `load_omniglot`.

    **Arguments:**

    - `data_dir`: a folder holding ``all_runs.zip``, or the zip itself; None to use the cache.
    - `image_size`: 28 or 32.
    - `cache_dir`: the download cache (default ``$FSDM_EQX_CACHE`` or ``~/.cache/fsdm_eqx``).
    - `download`: whether a missing zip may be downloaded.

    **Returns:**

    The runs in order ``run01`` .. ``run20``.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"Omniglot image_size={image_size} is not allowed; choose 28 or 32.")
    root = None if data_dir is None else as_path(data_dir)
    path, fix = _zip_path("runs", root, cache_dir, download, RUNS_CHECKSUM)
    try:
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); {fix}") from None
    runs: list[OneShotRun] = []
    for r in range(1, 21):
        run = f"run{r:02d}"
        try:
            lines = members[f"{run}/class_labels.txt"].decode().split()
            pairs = list(zip(lines[0::2], lines[1::2], strict=True))
            train_names = [f"{run}/training/class{i:02d}.png" for i in range(1, 21)]
            test_names = [f"{run}/test/item{i:02d}.png" for i in range(1, 21)]
            answer_of = {test: train_names.index(train) for test, train in pairs}
            training = [_decode(members[n], n, path, fix, image_size) for n in train_names]
            test = [_decode(members[n], n, path, fix, image_size) for n in test_names]
            answers = [answer_of[n] for n in test_names]
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path} does not hold the official run {run} ({e}); {fix}") from None
        runs.append(
            OneShotRun(
                np.stack(training)[:, None],
                np.stack(test)[:, None],
                np.asarray(answers, dtype=np.int64),
            )
        )
    return tuple(runs)
