"""CIFAR-100: the official archive layout (synthetic archives built here, including truncated,
corrupt and tampered ones), downloads through a fake opener, and the real data in ../shared."""

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fsdm_eqx.data import DataError, cifar100 as cifar_module, load_cifar100, superclass_of
from tests.conftest import shared_path

# Fine -> coarse label of CIFAR-100, an independent public reference: the `sparse2coarse` table of
# github.com/ryanchankh/cifar100coarse (sparse2coarse.py), copied verbatim into many repositories.
SPARSE2COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
])  # fmt: skip
COARSE_NAMES = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]
# The first and last official fine names, and a few in between, as printed on the CIFAR page.
FINE_SPOT_CHECK = {0: "apple", 1: "aquarium_fish", 2: "baby", 13: "bus", 49: "mountain",
                   53: "orange", 71: "sea", 99: "worm"}  # fmt: skip


def _pickle_part(images: np.ndarray, fine: np.ndarray) -> bytes:
    return pickle.dumps(
        {
            "batch_label": "synthetic",
            "fine_labels": fine.tolist(),
            "coarse_labels": SPARSE2COARSE[fine].tolist(),
            "data": images.reshape(len(images), -1),
        },
        protocol=2,
    )


@pytest.fixture(scope="module")
def synthetic() -> dict[str, object]:
    """Pickles in the official layout: 2 train and 1 test image per class, random pixels."""
    rng = np.random.default_rng(0)
    train_fine = np.repeat(np.arange(100), 2)
    test_fine = np.arange(100)
    train = rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8)
    meta = pickle.dumps(
        {
            "fine_label_names": list(cifar_module.FINE_LABEL_NAMES),
            "coarse_label_names": COARSE_NAMES,
        },
        protocol=2,
    )
    files = {"train": _pickle_part(train, train_fine), "test": _pickle_part(test, test_fine),
             "meta": meta}  # fmt: skip
    return {"files": files, "images": np.concatenate([train, test]),
            "labels": np.concatenate([train_fine, test_fine])}  # fmt: skip


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _use_md5_of(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(cifar_module, "MD5", hashlib.md5(data).hexdigest())


def _check(loaded: object, synthetic: dict[str, object]) -> None:
    assert isinstance(loaded, cifar_module.LabelledImages)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (300, 3, 32, 32)
    np.testing.assert_array_equal(loaded.images, synthetic["images"])
    np.testing.assert_array_equal(loaded.labels, synthetic["labels"])
    assert loaded.class_names == cifar_module.FINE_LABEL_NAMES


def test_pinned_names_match_independent_references() -> None:
    assert len(cifar_module.FINE_LABEL_NAMES) == 100 == len(set(cifar_module.FINE_LABEL_NAMES))
    assert tuple(COARSE_NAMES) == cifar_module.COARSE_LABEL_NAMES
    for index, name in FINE_SPOT_CHECK.items():
        assert cifar_module.FINE_LABEL_NAMES[index] == name
    got = [COARSE_NAMES.index(superclass_of(n)) for n in cifar_module.FINE_LABEL_NAMES]
    np.testing.assert_array_equal(got, SPARSE2COARSE)


def test_archive_in_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic) -> None:
    archive = _tar(synthetic["files"])
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(archive)
    _use_md5_of(monkeypatch, archive)
    _check(load_cifar100(tmp_path), synthetic)
    _check(load_cifar100(tmp_path / "cifar-100-python.tar.gz"), synthetic)


def test_extracted_folder(tmp_path: Path, synthetic) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, data in synthetic["files"].items():
        (folder / name).write_bytes(data)
    _check(load_cifar100(tmp_path), synthetic)
    _check(load_cifar100(folder), synthetic)


def test_npz_layout(tmp_path: Path, synthetic) -> None:
    np.savez(
        tmp_path / "subset.npz",
        images=synthetic["images"].transpose(0, 2, 3, 1),
        fine_labels=synthetic["labels"],
        fine_label_names=np.array(cifar_module.FINE_LABEL_NAMES),
    )
    _check(load_cifar100(tmp_path), synthetic)


def test_wrong_checksum(tmp_path: Path, synthetic) -> None:
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(_tar(synthetic["files"]))
    expected = r"tar\.gz has md5 .* not the expected eb9058c3a382ffc7106e4002c42a8d85.*--data-dir"
    with pytest.raises(DataError, match=expected):
        load_cifar100(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "garbage"])
def test_truncated_or_corrupt_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic, damage: str
) -> None:
    archive = _tar(synthetic["files"])
    if damage == "truncate":
        archive = archive[: len(archive) // 2]
    elif damage == "corrupt":
        middle = len(archive) // 2
        archive = (
            archive[:middle]
            + bytes(b ^ 0xFF for b in archive[middle : middle + 64])
            + (archive[middle + 64 :])
        )
    else:
        archive = b"<html>Not Found</html>"
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(archive)
    _use_md5_of(monkeypatch, archive)  # past the checksum: the reader itself must fail cleanly
    with pytest.raises(DataError) as info:
        load_cifar100(tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic) -> None:
    archive = _tar({k: v for k, v in synthetic["files"].items() if k != "test"})
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(archive)
    _use_md5_of(monkeypatch, archive)
    with pytest.raises(DataError, match="lacks the member"):
        load_cifar100(tmp_path)


def test_tampered_pickle_runs_nothing(tmp_path: Path, synthetic) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    files = dict(synthetic["files"], meta=pickle.dumps(Exploit(), protocol=2))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(DataError, match="system is not allowed"):
        load_cifar100(tmp_path)
    assert not marker.exists()


def test_mislabelled_coarse_labels_are_refused(tmp_path: Path, synthetic) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    bad = pickle.loads(synthetic["files"]["test"])
    bad["coarse_labels"] = [(c + 1) % 20 for c in bad["coarse_labels"]]
    files = dict(synthetic["files"], test=pickle.dumps(bad, protocol=2))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(DataError, match="fine and coarse"):
        load_cifar100(tmp_path)


def test_bad_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_cifar100(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds neither"):
        load_cifar100(tmp_path)
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_cifar100(tmp_path)


def test_download_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic) -> None:
    archive = _tar(synthetic["files"])
    _use_md5_of(monkeypatch, archive)
    urls: list[str] = []

    def opener(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO(archive)

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    monkeypatch.setenv("FSDM_EQX_CACHE", str(tmp_path / "env-cache"))
    _check(load_cifar100(cache_dir=tmp_path / "cache"), synthetic)
    assert urls == [cifar_module.URL]
    assert (tmp_path / "cache" / "cifar-100-python.tar.gz").read_bytes() == archive
    assert not (tmp_path / "env-cache").exists()
    _check(load_cifar100(cache_dir=tmp_path / "cache", download=False), synthetic)
    assert len(urls) == 1


def test_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def opener(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    with pytest.raises(DataError) as info:
        load_cifar100(cache_dir=tmp_path)
    message = str(info.value)
    assert cifar_module.URL in message and "--data-dir" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="downloads are off"):
        load_cifar100(cache_dir=tmp_path, download=False)


@pytest.fixture(scope="module")
def real() -> cifar_module.LabelledImages:
    return load_cifar100(shared_path("data", "cifar100", "cifar100_subset.npz"))


def test_real_subset(real: cifar_module.LabelledImages) -> None:
    raw = np.load(shared_path("data", "cifar100", "cifar100_subset.npz"))
    assert real.images.shape == (17000, 3, 32, 32) and real.images.dtype == np.uint8
    np.testing.assert_array_equal(real.images[123], raw["images"][123].transpose(2, 0, 1))
    np.testing.assert_array_equal(np.bincount(real.labels), np.full(100, 170))
    assert tuple(raw["fine_label_names"]) == cifar_module.FINE_LABEL_NAMES
    # The per-channel mean of the stored subset, as recorded in its PROVENANCE.md.
    mean = real.images.mean(axis=(0, 2, 3)) / 255.0
    np.testing.assert_allclose(mean, [0.5057, 0.4859, 0.4396], atol=1e-4)
