"""Atomic checkpoints of the whole training state, with exact resume.

A checkpoint is a directory ``step_XXXXXXXX`` holding ``state.eqx`` (the leaves of the
`TrainState`: model, EMA, optimiser state, step and key, through `eqx.tree_serialise_leaves`) and
``metadata.json`` (the step, the run's configuration, the sampler position, the SHA-256 and size
of ``state.eqx`` and the shape of every leaf). It is written into a hidden temporary sibling,
synced to disk, then renamed into place, so a directory named ``step_*`` is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from .state import TrainState

STATE_FILE = "state.eqx"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be restored: missing, corrupt, truncated or incompatible."""


def _is_key(x: object) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _to_host(tree: PyTree) -> PyTree:
    """Arrays as numpy; a replicated array spread over several hosts is read from this host."""

    def convert(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))
        return x

    return jax.tree_util.tree_map(convert, tree)


def _leaf_specs(tree: PyTree) -> list[list[Any]]:
    """Shape and dtype of every leaf that `eqx.tree_serialise_leaves` writes."""
    leaves = jax.tree_util.tree_leaves(tree)
    kept = [x for x in leaves if eqx.is_array(x) or isinstance(x, bool | int | float | complex)]
    return [
        [
            list(np.shape(x)),
            str(x.dtype if isinstance(x, jax.Array | np.ndarray) else np.dtype(type(x))),
        ]
        for x in kept
    ]


def _fsync_directory(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[tuple[int, pathlib.Path]]:
    """The complete checkpoints in ``directory`` as ``(step, path)``, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found: list[tuple[int, pathlib.Path]] = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / METADATA_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> pathlib.Path | None:
    """The newest complete checkpoint in ``directory``, or None if it holds none."""
    found = checkpoint_steps(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: TrainState,
    *,
    metadata: dict[str, Any],
    keep: int = 3,
) -> pathlib.Path:
    """Write ``state`` atomically to ``directory/step_{step:08d}`` and keep the newest ``keep``.

    **Arguments:**
    - `directory`: the run's checkpoint directory (created if missing).
    - `state`: the training state; it is pulled to the host.
    - `metadata`: anything JSON (the run configuration, the sampler position, class splits).
    - `keep`: how many checkpoints to keep, newest first; older ones are deleted.

    **Returns:** the path of the new checkpoint.
    """
    if keep < 1:
        raise ValueError(f"save_checkpoint(keep={keep}) is not allowed; keep at least 1.")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    step = int(state.step)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        host_state = _to_host(_keys_to_data(state))
        state_path = tmp / STATE_FILE
        with state_path.open("wb") as f:
            eqx.tree_serialise_leaves(f, host_state)
            f.flush()
            os.fsync(f.fileno())
        record = {
            **metadata,
            "step": step,
            "format_version": FORMAT_VERSION,
            "state_sha256": _sha256(state_path),
            "state_bytes": state_path.stat().st_size,
            "leaves": _leaf_specs(host_state),
        }
        with (tmp / METADATA_FILE).open("w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_directory(tmp)
        if final.exists():
            old = directory / f".tmp-step_{step:08d}-{os.getpid()}-replaced"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_directory(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, path in checkpoint_steps(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _read_metadata(path: pathlib.Path) -> dict[str, Any]:
    meta_path = path / METADATA_FILE
    try:
        with meta_path.open(encoding="utf-8") as f:
            metadata = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{meta_path} is missing: {path} is not a complete checkpoint."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt (not valid JSON: {e}).") from None
    if not isinstance(metadata, dict) or "state_sha256" not in metadata:
        raise CheckpointError(f"{meta_path} is corrupt: it lacks the state file's checksum.")
    return metadata


def _check_state_file(path: pathlib.Path, metadata: dict[str, Any]) -> pathlib.Path:
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing from the checkpoint.")
    size = state_path.stat().st_size
    if size < int(metadata.get("state_bytes", size)):
        raise CheckpointError(
            f"{state_path} is truncated: {size} bytes of the {metadata['state_bytes']} written."
        )
    if _sha256(state_path) != metadata["state_sha256"]:
        raise CheckpointError(
            f"{state_path} is corrupt: its SHA-256 does not match the one in {METADATA_FILE}."
        )
    return state_path


def _check_compatible(state_path: pathlib.Path, metadata: dict[str, Any], like: PyTree) -> None:
    expected = _leaf_specs(like)
    stored = metadata.get("leaves")
    if stored is None:
        return
    if len(stored) != len(expected):
        raise CheckpointError(
            f"{state_path} is incompatible with the current model configuration: it holds "
            f"{len(stored)} arrays where the training state has {len(expected)}."
        )
    for index, (have, want) in enumerate(zip(stored, expected, strict=True)):
        if have != want:
            raise CheckpointError(
                f"{state_path} is incompatible with the current model configuration: array "
                f"{index} has shape {tuple(have[0])} and dtype {have[1]} in the checkpoint but "
                f"shape {tuple(want[0])} and dtype {want[1]} in the training state."
            )


def restore_checkpoint(
    path_or_directory: str | os.PathLike[str], like: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """Load a checkpoint into the structure of ``like``.

    **Arguments:**
    - `path_or_directory`: a checkpoint (`.../step_XXXXXXXX`) or a run directory, whose newest
      complete checkpoint is taken.
    - `like`: a training state of the current configuration; it gives the structure, the
      shapes, the key implementation and the placement (sharding) of the restored arrays.

    **Returns:** `(state, metadata)`.

    **Raises:** `CheckpointError` with one sentence naming the file and what is wrong.
    """
    path = pathlib.Path(path_or_directory)
    if not (path / METADATA_FILE).is_file() and not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path} holds no complete checkpoint (no step_*/{METADATA_FILE})."
            )
        path = latest
    metadata = _read_metadata(path)
    state_path = _check_state_file(path, metadata)
    like_data = _keys_to_data(like)
    _check_compatible(state_path, metadata, like_data)
    try:
        with state_path.open("rb") as f:
            loaded = eqx.tree_deserialise_leaves(f, like_data)
            trailing = f.read(1)
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(
            f"{state_path} does not match the current training state's structure ({e})."
        ) from None
    if trailing:
        raise CheckpointError(
            f"{state_path} is incompatible with the current model configuration: it holds more "
            "arrays than the training state."
        )

    def place(new: Any, old: Any) -> Any:
        if _is_key(old):
            new = jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
        if isinstance(old, jax.Array):
            return jax.device_put(new, old.sharding)
        return new

    state = jax.tree_util.tree_map(place, loaded, like)
    return state, metadata
