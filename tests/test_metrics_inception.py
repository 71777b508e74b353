"""The FID InceptionV3 port: golden features, resize conventions, the torch-free .pth reader, the
download/cache path with its errors, and sharding over fake devices."""

import collections
import hashlib
import importlib.util
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.metrics import (
    InceptionV3,
    InceptionWeightsError,
    _inception_weights as weights_io,
    inception_features,
    load_inception,
)
from fsdm_eqx.metrics.inception import expected_shapes, preprocess
from tests.conftest import shared_path

WEIGHTS = "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz"
GOLDEN = "fid_inception_reference_features.npz"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_KEYS = {
    "tf1": "features_input_u8_minus128_div128",
    "pytorch_fid": "features_input_2x_div255_minus1",
}


def torch_python() -> str:
    """An interpreter with torch: this one, ``$FSDM_EQX_TORCH_PYTHON``, or the test skips."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    candidate = os.environ.get("FSDM_EQX_TORCH_PYTHON", "/tmp/torchvenv/bin/python")
    if os.path.exists(candidate):
        return candidate
    pytest.skip("torch is absent (set FSDM_EQX_TORCH_PYTHON to an interpreter that has it)")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights_path() -> str:
    return shared_path("weights", WEIGHTS)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(shared_path("weights", GOLDEN)) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def npz_weights(weights_path: str) -> dict[str, np.ndarray]:
    return weights_io.read_npz(weights_path)


@pytest.fixture(scope="module")
def model(npz_weights: dict[str, np.ndarray]) -> InceptionV3:
    return InceptionV3(npz_weights)


@pytest.fixture(scope="module")
def golden_features(model: InceptionV3, golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Features of the golden images on one device, in both conventions (one network compile).

    Batches of 4 for 6 images: two batches, the second one padded, so the batching, padding and
    trimming are part of what the golden comparison checks.
    """
    images = golden["images_uint8_nhwc"]
    return {
        c: inception_features(model, images, convention=c, batch_size=4, channels_last=True)
        for c in GOLDEN_KEYS
    }


# --------------------------------------------------------------------------- golden features


@pytest.mark.parametrize("convention", ["tf1", "pytorch_fid"])
def test_golden_features(
    golden_features: dict[str, np.ndarray], golden: dict[str, np.ndarray], convention: str
) -> None:
    ref = golden[GOLDEN_KEYS[convention]]
    feats = golden_features[convention]
    assert feats.shape == (len(ref), 2048) and feats.dtype == np.float32
    abs_err = float(np.max(np.abs(feats - ref)))
    rel_err = abs_err / float(np.max(np.abs(ref)))
    big = np.abs(ref) > 1e-2 * np.max(np.abs(ref))
    elementwise = float(np.max(np.abs(feats - ref)[big] / np.abs(ref[big])))
    print(
        f"{convention}: max abs error {abs_err:.3e}, relative to max |feature| {rel_err:.3e}, "
        f"max elementwise relative error over features above 1% of the max {elementwise:.3e}"
    )
    assert rel_err < 1e-4
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))
    # The two conventions differ in the golden file, so each one is checked for what it is.
    other = golden[GOLDEN_KEYS["pytorch_fid" if convention == "tf1" else "tf1"]]
    assert np.max(np.abs(feats[:4] - other[:4])) > 100 * abs_err


def test_rejects_bad_images(model: InceptionV3) -> None:
    with pytest.raises(ValueError, match="uint8"):
        inception_features(model, np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        inception_features(model, np.zeros((2, 4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="check channels_last"):
        inception_features(model, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(n, c, h, w\)"):
        inception_features(model, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises((ValueError, TypeError), match="convention"):  # beartype or ours
        inception_features(
            model,
            np.zeros((2, 3, 8, 8), np.uint8),
            convention="tf2",  # pyright: ignore[reportArgumentType]
        )


# --------------------------------------------------------------------------- resize references


def _tf1_resize_reference(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 ``resize_bilinear`` (no half-pixel centres), written from its kernel.

    As in the kernel, the source coordinate is computed in float32 (``dst * (float(in) / out)``),
    the upper tap is ``min(ceil(src), in - 1)``, and the value is interpolated along x first
    (``top``, ``bottom``), then along y; the interpolation itself is done here in float64.
    """
    f32 = np.float32

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi, frac = [], [], []
        for d in range(out):
            src = float(f32(d) * (f32(n_in) / f32(out)))
            lo.append(int(np.floor(src)))
            hi.append(min(int(np.ceil(src)), n_in - 1))
            frac.append(src - np.floor(src))
        return np.array(lo), np.array(hi), np.array(frac)

    (y0, y1, ly), (x0, x1, lx) = taps(img.shape[1]), taps(img.shape[2])
    rows0, rows1 = img[:, y0, :], img[:, y1, :]
    top = rows0[:, :, x0] + (rows0[:, :, x1] - rows0[:, :, x0]) * lx
    bottom = rows1[:, :, x0] + (rows1[:, :, x1] - rows1[:, :, x0]) * lx
    return top + (bottom - top) * ly[:, None]


def _torch_bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """torch ``interpolate(bilinear, align_corners=False)``, written from its kernel.

    The source coordinate ``(dst + 0.5) * (float(in) / out) - 0.5`` is computed in float32 as the
    kernel does and clamped at 0; the lower tap is ``int(src)``, the upper one ``lo + 1`` unless
    ``lo`` is the last pixel; weights ``1 - l`` and ``l``; the rest in float64.
    """
    f32 = np.float32

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi, frac = [], [], []
        for d in range(out):
            src = max(float((f32(d) + f32(0.5)) * (f32(n_in) / f32(out)) - f32(0.5)), 0.0)
            i0 = int(src)
            lo.append(i0)
            hi.append(i0 + 1 if i0 < n_in - 1 else i0)
            frac.append(src - i0)
        return np.array(lo), np.array(hi), np.array(frac)

    (y0, y1, ly), (x0, x1, lx) = taps(img.shape[1]), taps(img.shape[2])
    ly = ly[:, None]
    rows0, rows1 = img[:, y0, :], img[:, y1, :]
    return (1 - ly) * ((1 - lx) * rows0[:, :, x0] + lx * rows0[:, :, x1]) + ly * (
        (1 - lx) * rows1[:, :, x0] + lx * rows1[:, :, x1]
    )


@pytest.fixture(scope="module")
def resize_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),  # CIFAR: upsampling
        rng.integers(0, 256, (1, 28, 40), dtype=np.uint8),  # grey, non-square
        rng.integers(0, 256, (3, 401, 333), dtype=np.uint8),  # downsampling
    ]


@pytest.mark.parametrize("convention", ["tf1", "pytorch_fid"])
def test_resize_matches_numpy_reference(resize_inputs: list[np.ndarray], convention: Any) -> None:
    for img in resize_inputs:
        got = np.asarray(preprocess(jnp.asarray(img), convention))
        if convention == "tf1":
            ref = (_tf1_resize_reference(img.astype(np.float64), 299) - 128.0) / 128.0
        else:
            ref = 2.0 * _torch_bilinear_reference(img / 255.0, 299) - 1.0
        ref = np.broadcast_to(ref, (3, 299, 299))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_resize_conventions_differ_and_are_identity_at_299() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (3, 299, 299), dtype=np.uint8)
    x = img.astype(np.float64)
    np.testing.assert_allclose(preprocess(jnp.asarray(img), "tf1"), (x - 128) / 128, atol=1e-6)
    np.testing.assert_allclose(
        preprocess(jnp.asarray(img), "pytorch_fid"), 2 * x / 255 - 1, atol=1e-6
    )
    small = jnp.asarray(img[:, :32, :32])
    a, b = preprocess(small, "tf1"), preprocess(small, "pytorch_fid")
    assert float(jnp.max(jnp.abs(a - b))) > 0.1


# ------------------------------------------------------------------- .pth files without torch


class _Global:
    """A global reference written into a pickle without importing its module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:
        raise NotImplementedError


class _Storage:
    def __init__(self, key: str, kind: str, data: np.ndarray):
        self.key, self.kind, self.data = key, kind, data


class _Tensor:
    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_KINDS = {np.dtype(v): k for k, v in weights_io._STORAGE_DTYPES.items()}


class _PthPickler(pickle._Pickler):  # pyright: ignore[reportAttributeAccessIssue]
    """Writes torch's pickle: tensors as ``_rebuild_tensor_v2`` calls on persistent storages."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # pyright: ignore

    def __init__(self, file: Any):
        super().__init__(file, protocol=2)
        self.storages: dict[str, _Storage] = {}
        self.kinds: dict[str, _Global] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            self.storages[obj.key] = obj
            kind = self.kinds.setdefault(obj.kind, _Global("torch", obj.kind))
            return ("storage", kind, obj.key, "cpu", obj.data.size)
        return None

    def save_global_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_tensor(self, obj: _Tensor) -> None:
        hooks = collections.OrderedDict()
        args = (obj.storage, obj.offset, obj.size, obj.stride, False, hooks)
        self.save_reduce(_REBUILD, args, obj=obj)

    dispatch[_Global] = save_global_ref
    dispatch[_Tensor] = save_tensor


def tensors_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, _Tensor]:
    """Each array as a contiguous tensor with its own storage."""
    out = {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.ascontiguousarray(a)
        storage = _Storage(str(i), _KINDS[a.dtype], a.reshape(-1))
        stride = tuple(s // a.itemsize for s in a.strides)
        out[name] = _Tensor(storage, 0, a.shape, stride)
    return out


def write_pth(path: str, tensors: dict[str, Any], layout: str, byteorder: str = "little") -> None:
    """Write a torch checkpoint of ``tensors`` in the zip or legacy layout (see the reader)."""
    buf = io.BytesIO()
    pickler = _PthPickler(buf)
    pickler.dump(collections.OrderedDict(tensors))
    end = "<" if byteorder == "little" else ">"
    raw = {
        k: s.data.astype(s.data.dtype.newbyteorder(end)).tobytes()
        for k, s in pickler.storages.items()
    }
    if layout == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/byteorder", byteorder)
            for key, data in raw.items():
                z.writestr(f"archive/data/{key}", data)
            z.writestr("archive/version", "3\n")
        return
    with open(path, "wb") as f:
        for header in (
            0x1950A86A20F9469CFC6C,
            1001,
            {
                "protocol_version": 1001,
                "little_endian": byteorder == "little",
                "type_sizes": {"short": 2, "int": 4, "long": 8},
            },
        ):
            pickle.dump(header, f, protocol=2)
        f.write(buf.getvalue())
        keys = sorted(raw)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            f.write(struct.pack(end + "q", pickler.storages[key].data.size))
            f.write(raw[key])


def _strided(
    flat: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """The elements of a strided view, by explicit index arithmetic."""
    index = np.full(size, offset, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(size, stride, strict=True)):
        shape = [1] * len(size)
        shape[axis] = n
        index = index + (np.arange(n) * s).reshape(shape)
    return flat[index]


@pytest.fixture(scope="module")
def small_state() -> tuple[dict[str, _Tensor], dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    shared = _Storage("0", "FloatStorage", rng.standard_normal(48).astype(np.float32))
    base = _Storage("1", "FloatStorage", rng.standard_normal(15).astype(np.float32))
    tensors = {
        "a.conv.weight": _Tensor(shared, 0, (4, 3, 2, 2), (12, 4, 2, 1)),
        "a.view": _Tensor(shared, 6, (2, 3), (3, 1)),
        "b.transposed": _Tensor(base, 0, (5, 3), (1, 5)),
        "c.bn.num_batches_tracked": _Tensor(_Storage("2", "LongStorage", np.array([7])), 0, (), ()),
        "d.double": _Tensor(_Storage("3", "DoubleStorage", np.linspace(0, 1, 7)), 0, (7,), (1,)),
        "e.half": _Tensor(
            _Storage("4", "HalfStorage", np.arange(6, dtype=np.float16)), 2, (4,), (1,)
        ),
    }
    expected = {k: _strided(t.storage.data, t.offset, t.size, t.stride) for k, t in tensors.items()}
    return tensors, expected


@pytest.mark.parametrize(
    ("layout", "byteorder"), [("legacy", "little"), ("zip", "little"), ("zip", "big")]
)
def test_pth_reader_small(tmp_path: Any, small_state: Any, layout: str, byteorder: str) -> None:
    tensors, expected = small_state
    path = str(tmp_path / "small.pth")
    write_pth(path, tensors, layout, byteorder)
    got = weights_io.read_pth(path)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    converted = weights_io.to_npz_layout(got)
    assert set(converted) == {"a.conv.weight"} and converted["a.conv.weight"].dtype == np.float32


def test_pth_reader_refuses_other_globals(tmp_path: Any) -> None:
    class Evil:
        def __reduce__(self) -> Any:
            return (_Global("os", "system"), ("echo pwned > " + str(tmp_path / "pwned"),))

    buf = io.BytesIO()
    _PthPickler(buf).dump(collections.OrderedDict(x=Evil()))
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
    with pytest.raises(InceptionWeightsError, match=r"refusing to load the global os\.system"):
        weights_io.read_pth(path)
    assert not (tmp_path / "pwned").exists()


def test_pth_reader_truncated_and_garbage(tmp_path: Any, small_state: Any) -> None:
    tensors, _ = small_state
    path = tmp_path / "trunc.pth"
    write_pth(str(path), tensors, "legacy")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InceptionWeightsError, match="truncated") as err:
        weights_io.read_pth(path)
    assert "pass its path as inception_weights=PATH" in str(err.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InceptionWeightsError, match="not a readable torch state_dict"):
        weights_io.read_pth(garbage)
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        load_inception(tmp_path / "absent.pth")


def test_full_pth_matches_npz(tmp_path: Any, npz_weights: dict[str, np.ndarray]) -> None:
    """pytorch-fid's state_dict (with fc and counters) in the legacy layout converts to the npz."""
    rng = np.random.default_rng(4)
    state = dict(npz_weights)
    state["fc.weight"] = rng.standard_normal((1008, 2048)).astype(np.float32)
    state["fc.bias"] = np.zeros(1008, np.float32)
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
    path = str(tmp_path / weights_io.PTH_NAME)
    write_pth(path, tensors_from_arrays(state), "legacy")
    converted = weights_io.read_weights(path)
    assert set(converted) == set(npz_weights) == set(expected_shapes())
    for k, v in npz_weights.items():
        np.testing.assert_array_equal(converted[k], v)
    model = load_inception(path)
    assert isinstance(model, InceptionV3)


def test_wrong_weights_named(tmp_path: Any) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(InceptionWeightsError, match=r"lack Conv2d_1a_3x3\.bn\.weight"):
        load_inception(path)
    shapes = {k: np.zeros(s, np.float32) for k, s in expected_shapes().items()}
    shapes["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
    np.savez(path, **shapes)
    with pytest.raises(
        InceptionWeightsError, match=r"Mixed_7c\.branch_pool\.conv\.weight with shape"
    ):
        load_inception(path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 corrupt")
    with pytest.raises(InceptionWeightsError, match=r"not a readable \.npz"):
        load_inception(bad)


# --------------------------------------------------------------------------- download and cache


class _Opener:
    """Stands in for ``urllib.request.urlopen``: serves fixed bytes or raises."""

    def __init__(self, payload: bytes | Exception):
        self.payload = payload
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.calls.append(url)
        if isinstance(self.payload, Exception):
            raise self.payload
        return io.BytesIO(self.payload)


def _assert_one_sentence(err: BaseException) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.endswith(".") and msg[0].isupper()
    assert "inception_weights=PATH" in msg
    assert err.__suppress_context__ or err.__context__ is None


def test_offline_download_names_the_fix(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    opener = _Opener(urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", opener)
    monkeypatch.setenv("FSDM_EQX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InceptionWeightsError, match="Could not download") as err:
        load_inception()
    _assert_one_sentence(err.value)
    assert opener.calls == [weights_io.PTH_URL]
    assert os.listdir(tmp_path / "cache") == []


def test_corrupt_download_is_rejected(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _Opener(b"<html>rate limited</html>"))
    with pytest.raises(InceptionWeightsError, match="SHA-256") as err:
        weights_io.fetch_weights(directory=str(tmp_path))
    _assert_one_sentence(err.value)
    assert os.listdir(tmp_path) == []


def test_download_converts_and_caches(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, small_state: Any
) -> None:
    tensors, expected = small_state
    pth = tmp_path / "served.pth"
    write_pth(str(pth), tensors, "legacy")
    payload = pth.read_bytes()
    opener = _Opener(payload)
    monkeypatch.setattr(urllib.request, "urlopen", opener)
    monkeypatch.setenv("FSDM_EQX_CACHE", str(tmp_path / "cache"))
    assert weights_io.cache_dir() == str(tmp_path / "cache")
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    first = weights_io.fetch_weights(url="https://example.invalid/w.pth", sha256_prefix=prefix)
    second = weights_io.fetch_weights(url="https://example.invalid/w.pth", sha256_prefix=prefix)
    assert first == second == str(tmp_path / "cache" / weights_io.CACHED_NPZ_NAME)
    assert len(opener.calls) == 1
    assert os.listdir(tmp_path / "cache") == [weights_io.CACHED_NPZ_NAME]
    cached = weights_io.read_npz(first)
    np.testing.assert_array_equal(cached["a.conv.weight"], expected["a.conv.weight"])


def test_default_load_uses_cache_without_network(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, weights_path: str
) -> None:
    (tmp_path / weights_io.CACHED_NPZ_NAME).symlink_to(os.path.abspath(weights_path))
    monkeypatch.setenv("FSDM_EQX_CACHE", str(tmp_path))
    opener = _Opener(urllib.error.URLError("offline"))
    monkeypatch.setattr(urllib.request, "urlopen", opener)
    model = load_inception()
    assert isinstance(model, InceptionV3) and opener.calls == []


# --------------------------------------------------------------------------- torch cross-checks

_TORCH_SCRIPT = """
import sys, numpy as np, torch, torch.nn.functional as F
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
base = torch.randn(5, 3, generator=g)
shared = torch.randn(4, 3, 2, 2, generator=g)
state = {
    "a.conv.weight": shared,
    "a.view": shared.view(-1)[6:12].view(2, 3),
    "b.transposed": base.t(),
    "c.bn.num_batches_tracked": torch.tensor(7),
    "d.double": torch.linspace(0, 1, 7, dtype=torch.float64),
    "e.half": torch.arange(6, dtype=torch.float16)[2:],
    "f.param": torch.nn.Parameter(torch.ones(3)),
}
torch.save(state, out + "/zip.pth")
torch.save(state, out + "/legacy.pth", _use_new_zipfile_serialization=False)
arrays = {k: v.detach().numpy() for k, v in state.items()}
img = torch.randint(0, 256, (1, 3, 32, 40), generator=g).to(torch.uint8)
arrays["img"] = img.numpy()
x = img.float() / 255
arrays["resized"] = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).numpy()
np.savez(out + "/expected.npz", **arrays)
"""


def test_reader_and_resize_against_torch(tmp_path: Any) -> None:
    """Files written by torch itself (both layouts) read back; the resize matches torch's."""
    python = torch_python()
    subprocess.run([python, "-c", _TORCH_SCRIPT, str(tmp_path)], check=True, timeout=120)
    with np.load(tmp_path / "expected.npz") as data:
        expected = {k: data[k] for k in data.files}
    for layout in ("zip", "legacy"):
        got = weights_io.read_pth(tmp_path / f"{layout}.pth")
        for k in set(expected) - {"img", "resized"}:
            np.testing.assert_array_equal(got[k], expected[k])
            assert got[k].dtype == expected[k].dtype
    img = jnp.asarray(expected["img"][0])
    got = np.asarray(preprocess(img, "pytorch_fid"))
    # torch's vectorised kernel may fuse the source-coordinate multiply-add (one float32 rounding
    # fewer), which moves an interpolation weight by ~1e-6: the tolerance allows that and no more.
    np.testing.assert_allclose(got, 2 * expected["resized"][0] - 1, rtol=0, atol=1e-5)


_TORCH_END_TO_END = r"""
images = torch.from_numpy(np.load(sys.argv[3]))
x = images.float() / 255
x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
golden = np.load(sys.argv[4])["images_uint8_nhwc"]
g = torch.from_numpy(golden).permute(0, 3, 1, 2).float()
with torch.inference_mode():
    feats = net((2 * x - 1).to(dev)).cpu().numpy()
    golden_feats = net((2 * g / 255 - 1).to(dev)).cpu().numpy()
np.savez(sys.argv[5], feats=feats, golden=golden_feats)
"""


def _benchmark_torch_net() -> str:
    path = os.path.join(REPO, "benchmarks", "test_inception_throughput.py")
    spec = importlib.util.spec_from_file_location("_inception_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TORCH_NET


@pytest.mark.slow
def test_cifar_sized_images_match_torch_pytorch_fid(
    tmp_path: Any, weights_path: str, model: InceptionV3, golden: dict[str, np.ndarray]
) -> None:
    """End to end at 32x32 (upsampled to 299) against pytorch-fid's pipeline rebuilt in torch.

    The torch network is first checked against the golden features, so it is an independent
    reference; then 16 CIFAR-sized images go through torch's resize and network and ours.
    """
    python = torch_python()
    from fsdm_eqx.metrics.inception import ARCHITECTURE

    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(ARCHITECTURE))
    rng = np.random.default_rng(5)
    smooth = rng.integers(0, 256, (16, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
    noise = rng.integers(-20, 21, smooth.shape)
    images = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "torch.npz"
    script = _benchmark_torch_net() + _TORCH_END_TO_END
    golden_path = shared_path("weights", GOLDEN)
    args = [weights_path, str(arch), str(tmp_path / "images.npy"), golden_path, str(out)]
    subprocess.run([python, "-c", script, *args], check=True, timeout=600)
    with np.load(out) as r:
        torch_golden, torch_feats = r["golden"], r["feats"]
    ref = golden[GOLDEN_KEYS["pytorch_fid"]]
    assert np.max(np.abs(torch_golden - ref)) < 1e-4 * np.max(np.abs(ref))
    ours = inception_features(model, images, convention="pytorch_fid", batch_size=8)
    scale = float(np.max(np.abs(torch_feats)))
    err = float(np.max(np.abs(ours - torch_feats)))
    print(f"32x32 pytorch_fid end to end: max abs error {err:.3e}, relative {err / scale:.3e}")
    assert err < 1e-4 * scale


# --------------------------------------------------------------------------- sharding

_SHARD_SCRIPT = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from fsdm_eqx.metrics import inception_features, load_inception
from fsdm_eqx.metrics.inception import _network
assert len(jax.devices()) == 8, jax.devices()
model = load_inception(sys.argv[1])
with np.load(sys.argv[2]) as g:
    images = g["images_uint8_nhwc"]
# 6 images in a batch of 8 over 8 devices: one image per device, two of them padding.
sharded = inception_features(model, images, batch_size=8, channels_last=True)
mesh = Mesh(np.asarray(jax.devices()), ("data",))
batch = NamedSharding(mesh, PartitionSpec("data"))
x = jax.device_put(np.zeros((8, 3, 299, 299), np.float32), batch)
shards = [s.data.shape for s in _network(model, x).addressable_shards]
np.savez(sys.argv[3], sharded=sharded, shards=np.array(shards))
"""


@pytest.mark.slow
def test_sharded_features_equal_single_device(
    tmp_path: Any, weights_path: str, golden_features: dict[str, np.ndarray]
) -> None:
    """On 8 fake CPU devices the batch is split 1 image per device; features match one device."""
    golden_path = shared_path("weights", GOLDEN)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = tmp_path / "result.npz"
    subprocess.run(
        [sys.executable, "-c", _SHARD_SCRIPT, weights_path, golden_path, str(result)],
        check=True,
        env=env,
        timeout=300,
    )
    with np.load(result) as r:
        assert r["shards"].tolist() == [[1, 2048]] * 8
        single = golden_features["tf1"]
        scale = float(np.max(np.abs(single)))
        np.testing.assert_allclose(r["sharded"], single, rtol=0, atol=1e-5 * scale)


def test_architecture_matches_shared_weights(npz_weights: dict[str, np.ndarray]) -> None:
    """The architecture table names every array of the shared npz, with its shape: 94 convs."""
    shapes = expected_shapes()
    assert shapes == {k: v.shape for k, v in npz_weights.items()}
    assert sum(k.endswith(".conv.weight") for k in shapes) == 94
