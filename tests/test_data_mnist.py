"""MNIST: IDX parsing on synthetic files built here (gzip and raw, truncated and corrupt ones),
downloads through a fake opener, and the real test set in ../shared."""

import gzip
import hashlib
import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fsdm_eqx.data import DataError, load_mnist, mnist as mnist_module
from tests.conftest import shared_path


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def synthetic() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 30, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 8, dtype=np.uint8),
    }


def _payloads(synthetic: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {n: _idx(a, 2051 if "images" in n else 2049) for n, a in synthetic.items()}


def _pin(monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes], gz: dict[str, bytes]) -> None:
    files = {
        n: (hashlib.md5(gz[n]).hexdigest(), hashlib.md5(p).hexdigest(), mnist_module.FILES[n][2])
        for n, p in payloads.items()
    }
    monkeypatch.setattr(mnist_module, "FILES", files)


def test_idx_files_gz_and_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic) -> None:
    payloads = _payloads(synthetic)
    gz = {n: gzip.compress(p) for n, p in payloads.items()}
    _pin(monkeypatch, payloads, gz)
    for name in payloads:
        if name.startswith("train"):
            (tmp_path / f"{name}.gz").write_bytes(gz[name])
        else:
            (tmp_path / name).write_bytes(payloads[name])
    data = load_mnist("all", data_dir=tmp_path)
    assert data.images.shape == (38, 1, 28, 28) and data.class_names[3] == "3"
    np.testing.assert_array_equal(data.images[:30, 0], synthetic["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.images[30:, 0], synthetic["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.labels[30:], synthetic["t10k-labels-idx1-ubyte"])
    assert len(load_mnist("test", data_dir=tmp_path)) == 8


@pytest.mark.parametrize("damage", ["truncate_gz", "short_payload", "other_bytes", "bad_magic"])
def test_damaged_idx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic, damage: str
) -> None:
    payloads = _payloads(synthetic)
    name = "t10k-images-idx3-ubyte"
    gz = {n: gzip.compress(p) for n, p in payloads.items()}
    _pin(monkeypatch, payloads, gz)
    if damage == "truncate_gz":
        gz[name] = gz[name][: len(gz[name]) // 2]
    elif damage == "short_payload":
        payloads[name] = payloads[name][:-28]
    elif damage == "other_bytes":
        payloads[name] = payloads[name][:-1] + b"\x07"
    if damage == "bad_magic":
        payloads[name] = (2049).to_bytes(4, "big") + payloads[name][4:]
        files = dict(mnist_module.FILES)
        files[name] = (files[name][0], hashlib.md5(payloads[name]).hexdigest(), 2051)
        monkeypatch.setattr(mnist_module, "FILES", files)
    if damage != "truncate_gz":
        gz[name] = gzip.compress(payloads[name])
    for n in payloads:
        (tmp_path / f"{n}.gz").write_bytes(gz[n])
    with pytest.raises(DataError) as info:
        load_mnist("test", data_dir=tmp_path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_header_announcing_more_than_present() -> None:
    payload = _idx(np.zeros((3, 28, 28), np.uint8), 2051)[:-5]
    with pytest.raises(DataError, match="truncated"):
        mnist_module.parse_idx(payload, 2051, Path("x"), "fix it.")


def test_download_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic) -> None:
    payloads = _payloads(synthetic)
    gz = {n: gzip.compress(p) for n, p in payloads.items()}
    _pin(monkeypatch, payloads, gz)
    served = {m + f"{n}.gz": gz[n] for n in gz for m in mnist_module.MIRRORS[:1]}

    def opener(url: str, timeout: float) -> io.BytesIO:
        if url not in served:
            raise OSError("network is unreachable")
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    data = load_mnist("test", cache_dir=tmp_path)
    np.testing.assert_array_equal(data.labels, synthetic["t10k-labels-idx1-ubyte"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
    ]  # fmt: skip
    served.clear()
    with pytest.raises(DataError) as info:
        load_mnist("train", cache_dir=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value) and "--data-dir" in str(info.value)
    assert not any(p.name.startswith("train") or p.name.startswith(".") for p in tmp_path.iterdir())


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte\.gz"):
        load_mnist("train", data_dir=tmp_path)


def test_real_test_set() -> None:
    data = load_mnist(data_dir=shared_path("data", "mnist"))
    assert data.images.shape == (10000, 1, 28, 28) and data.images.dtype == np.uint8
    # Official facts (PROVENANCE.md): first labels, per-class counts, mean pixel value.
    np.testing.assert_array_equal(data.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    np.testing.assert_array_equal(
        np.bincount(data.labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert abs(float(data.images.mean()) - 33.79) < 0.01
