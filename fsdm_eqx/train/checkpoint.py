"""Atomic checkpoints of the whole training state, with exact resume.

A checkpoint is a directory ``step_XXXXXXXX`` holding ``state.eqx`` (the leaves of the
`TrainState`: model, EMA, optimiser state, step and key, through `eqx.tree_serialise_leaves`) and
``metadata.json`` (the step, the run's configuration, the sampler position, the SHA-256 and size
of ``state.eqx`` and the shape of every leaf). It is written into a hidden temporary sibling,
synced to disk, then renamed into place, so a directory named ``step_*`` is always complete.

A checkpoint damaged afterwards (a truncated or altered file) is named with what to do: resuming
a run directory skips it, with a warning, for the newest intact one (`resumable_checkpoint`).
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import warnings
from typing import Any, cast

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from .state import TrainState

STATE_FILE = "state.eqx"
METADATA_FILE = "metadata.json"
BEST_DIR = "best"
"""The subdirectory of a run directory that holds the checkpoint of its best evaluation."""
FORMAT_VERSION = 2
"""2: the optimiser state records the learning-rate schedule's count and horizon."""
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be restored: missing, corrupt, truncated or incompatible."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or corrupt (rather than one written for
    another configuration): resuming skips it for an older intact one.

    **Arguments:**
    - `path`: the checkpoint directory.
    - `problem`: what is wrong, naming the file (e.g. ``.../state.eqx is truncated: ...``).
    """

    def __init__(self, path: pathlib.Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"{problem}, so the checkpoint {path} is damaged; delete it (resuming the run "
            "directory then starts from its newest intact checkpoint) or restore another one."
        )


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


def _step_directories(directory: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """Every ``step_*`` directory in ``directory`` as ``(step, path)``, oldest first."""
    if not directory.is_dir():
        return []
    found: list[tuple[int, pathlib.Path]] = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[tuple[int, pathlib.Path]]:
    """The complete checkpoints in ``directory`` as ``(step, path)``, oldest first."""
    return [
        (step, path)
        for step, path in _step_directories(pathlib.Path(directory))
        if (path / METADATA_FILE).is_file()
    ]


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


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of the checkpoint ``path`` (a ``step_*`` directory): the one reader of
    ``metadata.json``, which checks that it is a JSON object with the state file's checksum and
    the step of the directory's name.

    **Raises:** `DamagedCheckpointError` naming the file, what is wrong and what to do.
    """
    path = pathlib.Path(path)
    meta_path = path / METADATA_FILE
    try:
        with meta_path.open(encoding="utf-8") as f:
            metadata = json.load(f)
    except FileNotFoundError:
        raise DamagedCheckpointError(path, f"{meta_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"{meta_path} is corrupt (not valid JSON: {e})"
        raise DamagedCheckpointError(path, problem) from None
    if not isinstance(metadata, dict) or "state_sha256" not in metadata:
        problem = f"{meta_path} is corrupt: it lacks the state file's checksum"
        raise DamagedCheckpointError(path, problem)
    metadata = cast(dict[str, Any], metadata)
    match = _STEP_DIR.match(path.name)
    if match and metadata.get("step") != int(match.group(1)):
        problem = f"{meta_path} is corrupt: it records step {metadata.get('step')!r}"
        raise DamagedCheckpointError(path, problem)
    return metadata


def _check_state_file(path: pathlib.Path, metadata: dict[str, Any]) -> pathlib.Path:
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise DamagedCheckpointError(path, f"{state_path} is missing")
    size = state_path.stat().st_size
    if size < int(metadata.get("state_bytes", size)):
        written = metadata["state_bytes"]
        problem = f"{state_path} is truncated: {size} bytes of the {written} written"
        raise DamagedCheckpointError(path, problem)
    if _sha256(state_path) != metadata["state_sha256"]:
        problem = f"{state_path} is corrupt: its SHA-256 does not match the one in {METADATA_FILE}"
        raise DamagedCheckpointError(path, problem)
    return state_path


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of the checkpoint ``path`` after checking its state file's size and SHA-256.

    **Raises:** `DamagedCheckpointError` naming the damaged file and what to do.
    """
    path = pathlib.Path(path)
    metadata = read_checkpoint_metadata(path)
    _check_state_file(path, metadata)
    return metadata


def resumable_checkpoint(directory: str | os.PathLike[str]) -> pathlib.Path | None:
    """The newest intact checkpoint in ``directory`` (`verify_checkpoint`), or None if it holds
    no checkpoint. Newer damaged ones are skipped with a warning that names them; a run is never
    silently restarted from scratch.

    **Raises:** `CheckpointError` when ``directory`` holds checkpoints but all are damaged,
    naming them and what to do.
    """
    directory = pathlib.Path(directory)
    damaged: list[DamagedCheckpointError] = []
    for _, path in reversed(_step_directories(directory)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        for e in damaged:
            warnings.warn(
                f"Skipping the damaged checkpoint {e.path} ({e.problem}) and resuming from the "
                f"older {path}; delete {e.path} unless the run saves that step again.",
                stacklevel=1,  # one location: a second call for the same run shows it once
            )
        return path
    if damaged:
        problems = "; ".join(e.problem for e in damaged)
        raise CheckpointError(
            f"{directory} holds only damaged checkpoints ({problems}); delete them to train "
            "from scratch, or choose another run directory."
        )
    return None


def _check_compatible(state_path: pathlib.Path, metadata: dict[str, Any], like: PyTree) -> None:
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path} has checkpoint format {version!r}, and this version of fsdm_eqx reads "
            f"format {FORMAT_VERSION} (its optimiser state records the learning-rate schedule); "
            "resume it with the version that wrote it, or train in a new run directory."
        )
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
      intact checkpoint is taken (`resumable_checkpoint`: newer damaged ones are skipped with a
      warning).
    - `like`: a training state of the current configuration; it gives the structure, the
      shapes, the key implementation and the placement (sharding) of the restored arrays.

    **Returns:** `(state, metadata)`.

    **Raises:** `CheckpointError` with one sentence naming the file and what is wrong
    (`DamagedCheckpointError` for missing, truncated or corrupt files).
    """
    path = pathlib.Path(path_or_directory)
    if not (path / METADATA_FILE).is_file() and not (path / STATE_FILE).is_file():
        latest = resumable_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path} holds no complete checkpoint (no step_*/{METADATA_FILE})."
            )
        path = latest
    metadata = read_checkpoint_metadata(path)
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
