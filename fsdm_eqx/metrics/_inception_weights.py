"""FID Inception weights for a user: download, verify, convert a torch ``.pth`` (no torch), cache.

The weights are pytorch-fid's port of the TensorFlow ``inception-2015-12-05`` graph, published as
``pt_inception-2015-12-05-6726825d.pth`` (the name carries the first 8 hex digits of its SHA-256).
A ``.pth`` file is a pickled ``state_dict`` whose tensors point at raw storages, in one of two
layouts:

- the zip layout (torch >= 1.6): ``<archive>/data.pkl`` is the pickle, each storage is the entry
  ``<archive>/data/<key>`` (raw little-endian bytes unless ``<archive>/byteorder`` says ``big``);
- the legacy layout (torch < 1.6, the layout of pytorch-fid's file): five consecutive pickles (the
  magic number ``0x1950a86a20f9469cfc6c``, the protocol version 1001, a dict of system info with
  ``little_endian``, the ``state_dict`` itself, the sorted list of storage keys), then for each key
  in that order an 8-byte little-endian element count followed by the raw storage bytes.

In both, a storage is a persistent id ``("storage", <torch.XStorage>, key, location, numel[,
view])`` and a tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.
The reader here unpickles with a whitelist of exactly those globals (plus ``OrderedDict``), so a
hostile file cannot run code, and rebuilds each tensor as a numpy array with ``as_strided``.
"""

import collections
import hashlib
import io
import os
import pickle
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME
PTH_SHA256_PREFIX = "6726825d"
CACHED_NPZ_NAME = "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights could not be obtained or read; the message names the fix."""


def _fix_hint() -> str:
    return (
        f"download {PTH_URL} yourself and pass its path as inception_weights=PATH "
        "(a .pth or a converted .npz)"
    )


def cache_dir() -> str:
    """The cache directory: ``$FSDM_EQX_CACHE`` if set, else ``~/.cache/fsdm_eqx``."""
    return os.environ.get("FSDM_EQX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fsdm_eqx"
    )


# --------------------------------------------------------------------------- .pth reader


class _StorageType:
    """Stand-in for a ``torch.XStorage`` class: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named in the pickle; its bytes are attached once read."""

    def __init__(self, dtype: np.dtype[Any], numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor as pickled: a strided view into a storage."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: Any):
        self.storage = storage
        self.offset = offset
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialise(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError("a tensor points at a storage that the file does not contain")
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, data.dtype)
        if needed >= data.size or self.offset < 0 or min(self.stride, default=0) < 0:
            raise ValueError("a tensor reaches past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=data.dtype.newbyteorder("="))


def _rebuild_tensor(storage: _StorageRef, offset: int, size: Any, stride: Any, *_: Any) -> Any:
    return _TensorRef(storage, int(offset), tuple(size), stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch ``state_dict`` and nothing else: any other global is refused."""

    def __init__(self, file: io.BufferedIOBase, storages: dict[str, _StorageRef], byteorder: str):
        super().__init__(file)
        self._storages = storages
        self._byteorder = byteorder
        self._views: list[tuple[_StorageRef, _StorageRef, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        root = self._storages.get(key)
        if root is None:
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            root = _StorageRef(dtype, numel)
            self._storages[key] = root
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy storage view: (view_key, offset, size)
            view_ref = _StorageRef(root.dtype, int(view[2]))
            self._views.append((view_ref, root, int(view[1])))
            return view_ref
        return root

    def attach_views(self) -> None:
        for view, root, offset in self._views:
            if root.data is not None:
                view.data = root.data[offset : offset + view.numel]


def _read_zip_pth(file: io.BufferedIOBase) -> Any:
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError("the zip holds no single data.pkl, so it is not a torch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _StorageRef] = {}
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages, byteorder)
        state = unpickler.load()
        for key, ref in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) < ref.numel * ref.dtype.itemsize:
                raise ValueError(f"storage {key} is shorter than its declared size")
            ref.data = np.frombuffer(raw, ref.dtype, count=ref.numel)
        unpickler.attach_views()
    return state


def _read_legacy_pth(file: io.BufferedIOBase) -> Any:
    def plain_load() -> Any:
        return _RestrictedUnpickler(file, {}, "little").load()

    if plain_load() != _LEGACY_MAGIC:
        raise ValueError("it is neither a zip nor a legacy torch file (wrong magic number)")
    if plain_load() != _LEGACY_PROTOCOL:
        raise ValueError("it uses an unsupported legacy torch protocol version")
    sys_info = plain_load()
    byteorder = "little" if dict(sys_info).get("little_endian", True) else "big"
    storages: dict[str, _StorageRef] = {}
    unpickler = _RestrictedUnpickler(file, storages, byteorder)
    state = unpickler.load()
    keys = plain_load()
    for key in keys:
        ref = storages[str(key)]
        header = file.read(8)
        if len(header) != 8:
            raise ValueError("the file ends before all storages were read (truncated?)")
        (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", header)
        nbytes = numel * ref.dtype.itemsize
        raw = file.read(nbytes)
        if numel != ref.numel or len(raw) != nbytes:
            raise ValueError("the file ends before all storages were read (truncated?)")
        ref.data = np.frombuffer(raw, ref.dtype)
    unpickler.attach_views()
    return state


def read_pth(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a torch ``state_dict`` file (zip or legacy layout) into numpy arrays, without torch.

    **Arguments:**
    - `path`: the ``.pth`` / ``.pt`` file.

    **Returns:** the tensors by name, as numpy arrays in native byte order.

    **Raises:** `InceptionWeightsError` when the file is missing, truncated, not a ``state_dict``
    or names a global outside the whitelist.
    """
    try:
        with open(path, "rb") as file:
            if zipfile.is_zipfile(file):
                file.seek(0)
                state = _read_zip_pth(file)
            else:
                file.seek(0)
                state = _read_legacy_pth(file)
        if not isinstance(state, Mapping):
            raise ValueError("its pickle is not a state_dict")
        return {
            str(k): v.materialise()
            for k, v in state.items()  # pyright: ignore[reportUnknownVariableType]
            if isinstance(v, _TensorRef)
        }
    except FileNotFoundError:
        raise InceptionWeightsError(
            f"The Inception weights file {path} does not exist; {_fix_hint()}."
        ) from None
    except (ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise InceptionWeightsError(
            f"{path} is not a readable torch state_dict ({e}); delete it and {_fix_hint()}."
        ) from None


# --------------------------------------------------------------------------- conversion


def to_npz_layout(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the conv and batch-norm arrays of the pool3 network, as float32 (``fc.*`` dropped).

    **Arguments:**
    - `state`: a pytorch-fid / torchvision ``state_dict`` as numpy arrays.

    **Returns:** the arrays named as in the npz layout (``<block>.<conv>.conv.weight``,
    ``...bn.weight``, ``...bn.bias``, ``...bn.running_mean``, ``...bn.running_var``).
    """
    suffixes = (
        ".conv.weight",
        ".bn.weight",
        ".bn.bias",
        ".bn.running_mean",
        ".bn.running_var",
    )
    return {
        k: np.ascontiguousarray(v, dtype=np.float32)
        for k, v in state.items()
        if k.endswith(suffixes) and not k.startswith(("fc.", "AuxLogits."))
    }


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an npz of weights into a dict, with one clear error when it cannot be read."""
    try:
        with open(path, "rb") as file:
            data = np.load(file, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single array, not named arrays")
            with data:
                return {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise InceptionWeightsError(
            f"The Inception weights file {path} does not exist; {_fix_hint()}."
        ) from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InceptionWeightsError(
            f"{path} is not a readable .npz ({e}); delete it and retry (without "
            f"inception_weights the weights are downloaded again), or {_fix_hint()}."
        ) from None


def read_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read weights from a ``.npz`` (npz layout) or a torch ``.pth`` / ``.pt`` file."""
    if os.fspath(path).endswith(".npz"):
        return read_npz(path)
    return to_npz_layout(read_pth(path))


# --------------------------------------------------------------------------- download + cache


def _download(url: str, dest_dir: str, sha256_prefix: str, timeout: float) -> str:
    """Download ``url`` into a temporary file in ``dest_dir``; verify its SHA-256 prefix."""
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=".pth", dir=dest_dir)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if not actual.startswith(sha256_prefix):
            raise InceptionWeightsError(
                f"The file downloaded from {url} has SHA-256 {actual[:16]}..., not "
                f"{sha256_prefix}... as expected, so it is corrupt or not the FID Inception "
                f"weights; retry later or {_fix_hint()}."
            )
        return tmp
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        os.unlink(tmp)
        raise InceptionWeightsError(
            f"Could not download the FID Inception weights from {url} ({e}); connect to the "
            f"internet and retry, or {_fix_hint()}."
        ) from None
    except BaseException:
        os.unlink(tmp)
        raise


def fetch_weights(
    *,
    url: str = PTH_URL,
    sha256_prefix: str = PTH_SHA256_PREFIX,
    directory: str | None = None,
    timeout: float = 60.0,
    validate: Callable[[Mapping[str, np.ndarray]], None] | None = None,
) -> str:
    """The path of the cached npz of FID Inception weights; downloads and converts on first use.

    The ``.pth`` is downloaded into the cache directory, checked against ``sha256_prefix``, read
    without torch, converted to the npz layout and moved into place with an atomic rename, so an
    interrupted run never leaves a partial file under the final name.

    **Arguments:**
    - `url`: where the ``.pth`` lives.
    - `sha256_prefix`: the leading hex digits its SHA-256 must have.
    - `directory`: the cache directory (default: `cache_dir()`).
    - `timeout`: the network timeout in seconds.
    - `validate`: called on the converted arrays before they are cached; raises when they are not
      the expected network.

    **Returns:** the path of the cached ``.npz``.
    """
    directory = directory or cache_dir()
    final = os.path.join(directory, CACHED_NPZ_NAME)
    if os.path.exists(final):
        return final
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise InceptionWeightsError(
            f"Cannot create the cache directory {directory} ({e}); set FSDM_EQX_CACHE to a "
            "writable directory or pass inception_weights=PATH."
        ) from None
    pth = _download(url, directory, sha256_prefix, timeout)
    fd, tmp_npz = tempfile.mkstemp(prefix=".convert-", suffix=".npz", dir=directory)
    try:
        arrays = to_npz_layout(read_pth(pth))
        if validate is not None:
            validate(arrays)
        with os.fdopen(fd, "wb") as out:
            np.savez(out, allow_pickle=False, **arrays)
        os.replace(tmp_npz, final)
    finally:
        for leftover in (pth, tmp_npz):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return final
