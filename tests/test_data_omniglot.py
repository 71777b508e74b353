"""Omniglot: the preprocessing against a numpy reference on synthetic zips, damaged zips, and the
official small subsets and one-shot runs in ../shared."""

import hashlib
import io
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdm_eqx.data import (
    DataError,
    LabelledImages,
    class_split,
    load_omniglot,
    load_omniglot_runs,
    omniglot as omniglot_module,
)
from tests.conftest import shared_path


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(bool)).save(buf, format="PNG")  # mode "1", as the originals
    return buf.getvalue()


@pytest.fixture(scope="module")
def drawings() -> dict[str, np.ndarray]:
    """Binary 112x112 drawings (1 = white paper, 0 = ink) of 2 alphabets x 2 characters x 3."""
    rng = np.random.default_rng(0)
    out = {}
    for alphabet in ("Alpha", "Beta"):
        for character in ("character01", "character02"):
            for k in range(3):
                name = f"images_background/{alphabet}/{character}/{k:04d}_{k:02d}.png"
                out[name] = rng.random((112, 112)) < 0.7
    return out


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    (tmp_path / "images_background.zip").write_bytes(data)
    monkeypatch.setitem(
        omniglot_module.CHECKSUMS, "background", ("md5", hashlib.md5(data).hexdigest())
    )


@pytest.mark.parametrize("size", [28])
def test_preprocessing_matches_numpy_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drawings: dict[str, np.ndarray], size: int
) -> None:
    _install(tmp_path, monkeypatch, _zip({n: _png(d) for n, d in drawings.items()}))
    data = load_omniglot(("background",), image_size=size, data_dir=tmp_path)
    assert data.images.shape == (12, 1, size, size) and data.images.dtype == np.uint8
    assert data.class_names == (
        "background/Alpha/character01", "background/Alpha/character02",
        "background/Beta/character01", "background/Beta/character02",
    )  # fmt: skip
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(4), 3))
    # Reference: invert (ink becomes 255) and average 4x4 blocks (a box filter, 112 = 4 * 28).
    for i, name in enumerate(sorted(drawings)):
        ink = 255.0 * (1 - drawings[name])
        expected = ink.reshape(size, 112 // size, size, 112 // size).mean(axis=(1, 3))
        # PIL resamples in 8-bit fixed point: within one grey level of the exact mean.
        np.testing.assert_allclose(data.images[i, 0], expected, atol=1.0)


def test_size_32_and_bad_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drawings: dict[str, np.ndarray]
) -> None:
    _install(tmp_path, monkeypatch, _zip({n: _png(d) for n, d in drawings.items()}))
    assert load_omniglot(("background",), image_size=32, data_dir=tmp_path).images.shape[-2:] == (
        32, 32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="choose 28 or 32"):
        load_omniglot(image_size=30, data_dir=tmp_path)
    one_zip = tmp_path / "images_background.zip"
    assert len(load_omniglot(("background",), data_dir=one_zip)) == 12
    with pytest.raises(ValueError, match="pass the folder"):
        load_omniglot(("background", "evaluation"), data_dir=one_zip)


@pytest.mark.parametrize("damage", ["truncate", "bad_png", "checksum"])
def test_damaged_zips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drawings: dict[str, np.ndarray], damage: str
) -> None:
    members = {n: _png(d) for n, d in drawings.items()}
    if damage == "bad_png":
        first = sorted(members)[0]
        members[first] = members[first][:40]
    data = _zip(members)
    if damage == "truncate":
        data = data[: len(data) // 2]
    _install(tmp_path, monkeypatch, data)
    if damage == "checksum":
        monkeypatch.setitem(omniglot_module.CHECKSUMS, "background", ("md5", "0" * 32))
    with pytest.raises(DataError) as info:
        load_omniglot(("background",), data_dir=tmp_path)
    assert "images_background.zip" in str(info.value) and "\n" not in str(info.value)


def test_download_into_cache_and_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drawings: dict[str, np.ndarray]
) -> None:
    archive = _zip({n: _png(d) for n, d in drawings.items()})
    monkeypatch.setitem(
        omniglot_module.CHECKSUMS, "background", ("md5", hashlib.md5(archive).hexdigest())
    )
    urls: list[str] = []

    def opener(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        if len(urls) > 1:
            raise urllib.error.URLError("network is unreachable")
        return io.BytesIO(archive)

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    data = load_omniglot(("background",), cache_dir=tmp_path)
    assert len(data) == 12 and urls == [omniglot_module.BASE_URLS[0] + "images_background.zip"]
    assert (tmp_path / "images_background.zip").read_bytes() == archive
    with pytest.raises(DataError) as info:
        load_omniglot(("evaluation",), cache_dir=tmp_path)
    message = str(info.value)
    assert "images_evaluation.zip" in message and "--data-dir" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images_background.zip"]


def test_missing_zip_and_offline(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"images_evaluation\.zip is missing"):
        load_omniglot(("evaluation",), data_dir=tmp_path)
    with pytest.raises(DataError, match="downloads are off"):
        load_omniglot(("evaluation",), cache_dir=tmp_path, download=False)


@pytest.fixture(scope="module")
def small() -> LabelledImages:
    return load_omniglot(
        ("background_small1", "background_small2"), data_dir=shared_path("data", "omniglot")
    )


def test_official_small_subsets(small: LabelledImages) -> None:
    # 136 + 156 characters of 20 drawings each (PROVENANCE.md); Greek and Latin appear in both.
    assert len(small.class_names) == 136 + 156
    np.testing.assert_array_equal(np.bincount(small.labels), np.full(292, 20))
    assert small.images.shape == (292 * 20, 1, 28, 28)
    # Strokes bright on a dark background after inversion: most pixels are near 0.
    assert np.median(small.images) == 0 and small.images.max() == 255
    alphabets = {n.split("/")[1] for n in small.class_names}
    assert {"Balinese", "Korean", "Tagalog", "Japanese_(katakana)"} <= alphabets
    # The shared alphabets hold identical drawings in both zips.
    a = small.class_names.index("background_small1/Greek/character01")
    b = small.class_names.index("background_small2/Greek/character01")
    np.testing.assert_array_equal(small.images[small.labels == a], small.images[small.labels == b])


def test_small_subsets_split(small: LabelledImages) -> None:
    # Background characters only: the official split needs the evaluation characters too.
    with pytest.raises(ValueError, match="evaluation subsets"):
        class_split("background_evaluation", small.labels, class_names=small.class_names)
    split = class_split("random", small.labels, class_names=small.class_names, seed=1)
    assert sorted(split.train + split.val + split.test) == list(range(292))


def test_official_one_shot_runs() -> None:
    runs = load_omniglot_runs(shared_path("data", "omniglot"))
    assert len(runs) == 20
    for run in runs:
        assert run.training.shape == run.test.shape == (20, 1, 28, 28)
        # Each test drawing names one training character, each character exactly once.
        np.testing.assert_array_equal(np.sort(run.answers), np.arange(20))
    # A 1-nearest-neighbour classifier on pixels is far above chance (5%) on the official runs.
    correct = 0
    for run in runs:
        train = run.training.reshape(20, -1).astype(np.float64)
        test = run.test.reshape(20, -1).astype(np.float64)
        d = ((test[:, None] - train[None]) ** 2).sum(-1)
        correct += int((d.argmin(1) == run.answers).sum())
    assert correct / 400 > 0.2
