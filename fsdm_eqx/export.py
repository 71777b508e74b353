"""Export the EMA model of a checkpoint to one portable ``.npz`` file, and load it back.

``python -m fsdm_eqx.export --checkpoint runs/smoke --out model.npz`` reads the newest checkpoint
of the run directory (or the given ``step_*`` checkpoint) and writes only what generating needs:
every array of the EMA model under its tree path (``jax.tree_util.keystr``, e.g.
``.denoiser.blocks[0].attention.qkv.weight``), the experiment configuration as JSON and the
training step; no raw model and no optimiser state, so it is about a quarter of the checkpoint.
Plain NumPy reads it (``np.load``); `load_exported` rebuilds the model from the configuration, and
``python -m fsdm_eqx.sample --checkpoint model.npz`` samples from it.
"""

import dataclasses
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._cli import run_config_cli
from .config import check_fields, no_type_check
from .experiment.config import ExperimentConfig, experiment_config_from_dict
from .nn.fsdm import FSDM
from .sample import load_ema_model
from .train.checkpoint import CheckpointError

__all__ = ["EXPORT_FORMAT", "ExportConfig", "ExportError", "export_model", "load_exported", "main"]

EXPORT_FORMAT = 1
"""Version of the file layout, stored under ``__fsdm_eqx_export__``."""
_FORMAT_KEY = "__fsdm_eqx_export__"
_CONFIG_KEY = "__experiment__"
_STEP_KEY = "__step__"
_ZIP_MAGIC = b"PK\x03\x04"
_AGAIN = "export it again from its checkpoint with python -m fsdm_eqx.export"


class ExportError(CheckpointError):
    """An exported model file that cannot be loaded: missing, damaged, not an export, or not
    matching the model its configuration builds."""


@no_type_check
@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Write the EMA weights and the experiment configuration of a checkpoint to one file."""

    checkpoint: str
    """A run directory (its newest intact checkpoint is used) or one ``step_*`` directory."""
    out: str = "model.npz"
    """The file to write (its name ends in .npz; its folder is created if missing)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.out.lower().endswith(".npz"):
            raise ValueError(
                f"ExportConfig.out={self.out!r} is not allowed; give a file name ending in .npz "
                "(the sample command recognises an export by it)."
            )


def _array_leaves(model: FSDM) -> dict[str, np.ndarray]:
    """Every array leaf of ``model`` on the host, keyed by its tree path."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(model)
        if eqx.is_array(leaf)
    }


def export_model(
    model: FSDM, config: ExperimentConfig, step: int, out: str | os.PathLike[str]
) -> Path:
    """Write ``model``'s arrays, ``config`` and ``step`` to the ``.npz`` file ``out``, atomically
    (a temporary sibling, synced, then renamed: ``out`` is never left half written).

    **Arguments:**
    - `model`: the model to export (the EMA model of a checkpoint).
    - `config`: the experiment configuration that builds it.
    - `step`: the training step it was saved at.
    - `out`: the file to write; its folder is created if missing.

    **Returns:** the path written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    entries = {
        **_array_leaves(model),
        _FORMAT_KEY: np.asarray(EXPORT_FORMAT, np.int64),
        _CONFIG_KEY: np.asarray(json.dumps(dataclasses.asdict(config), sort_keys=True)),
        _STEP_KEY: np.asarray(step, np.int64),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            np.savez(f, allow_pickle=False, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _read_entries(path: Path) -> dict[str, np.ndarray]:
    """Every entry of the export ``path``, read in full (so that a damaged one fails here)."""
    if not path.is_file():
        raise ExportError(
            f"The exported model {path} does not exist; write it with python -m fsdm_eqx.export "
            "--checkpoint RUN_DIR, or pass a run directory."
        )
    with path.open("rb") as f:  # opened here: np.load leaks its handle on a broken archive
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            raise ExportError(
                f"{path} is not a model exported by fsdm_eqx (not an .npz archive); pass a file "
                "written by python -m fsdm_eqx.export, or a run directory."
            )
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as archive:
                entries = {name: archive[name] for name in archive.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise ExportError(f"{path} is damaged ({e}); {_AGAIN}.") from None
    if not {_FORMAT_KEY, _CONFIG_KEY, _STEP_KEY} <= entries.keys():
        raise ExportError(
            f"{path} is not a model exported by fsdm_eqx (it lacks the experiment "
            "configuration); pass a file written by python -m fsdm_eqx.export, or a run directory."
        )
    version = int(entries[_FORMAT_KEY])
    if version != EXPORT_FORMAT:
        raise ExportError(
            f"{path} has export format {version}, and this version of fsdm_eqx reads format "
            f"{EXPORT_FORMAT}; {_AGAIN} using this version."
        )
    return entries


def _mismatches(
    stored: dict[str, np.ndarray], expected: dict[str, jax.ShapeDtypeStruct]
) -> list[str]:
    """What differs between the stored arrays and those the model needs, one phrase each."""
    problems = [f"{name} is missing" for name in expected if name not in stored]
    problems += [f"{name} is not in the model" for name in stored if name not in expected]
    for name, want in expected.items():
        have = stored.get(name)
        if have is not None and (have.shape != want.shape or have.dtype != want.dtype):
            problems.append(
                f"{name} has shape {have.shape} and dtype {have.dtype} in the file but shape "
                f"{tuple(want.shape)} and dtype {want.dtype} in the model"
            )
    return problems


def load_exported(path: str | os.PathLike[str]) -> tuple[FSDM, ExperimentConfig, int]:
    """The model of a file written by `export_model`, in inference mode.

    The model's structure is rebuilt from the stored configuration (without initialising
    weights), then every array is filled from the file, after checking that the paths, shapes
    and dtypes are exactly those the configuration builds.

    **Arguments:**
    - `path`: the ``.npz`` file.

    **Returns:** `(model, config, step)`, as `fsdm_eqx.sample.load_ema_model` returns them.

    **Raises:** `ExportError` with one sentence when the file is missing, damaged, not an export
    or does not match the model its configuration builds.
    """
    path = Path(path)
    entries = _read_entries(path)
    try:
        config = experiment_config_from_dict(json.loads(str(entries[_CONFIG_KEY])))
    except (TypeError, ValueError, AttributeError) as e:
        raise ExportError(
            f"The experiment configuration stored in {path} cannot be read ({e}); {_AGAIN} "
            "using this version of fsdm_eqx."
        ) from None
    like = eqx.filter_eval_shape(FSDM, config.model, key=jax.random.PRNGKey(0))
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    expected = {
        jax.tree_util.keystr(p): leaf for p, leaf in flat if isinstance(leaf, jax.ShapeDtypeStruct)
    }
    stored = {name: value for name, value in entries.items() if not name.startswith("__")}
    problems = _mismatches(stored, expected)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ExportError(
            f"{path} does not match the model its configuration builds ({'; '.join(problems[:3])}"
            f"{more}); {_AGAIN} using this version of fsdm_eqx."
        )
    leaves = [
        jnp.asarray(stored[jax.tree_util.keystr(p)])
        if isinstance(leaf, jax.ShapeDtypeStruct)
        else leaf
        for p, leaf in flat
    ]
    model = jax.tree_util.tree_unflatten(treedef, leaves)
    return eqx.nn.inference_mode(model), config, int(entries[_STEP_KEY])


def run_export(config: ExportConfig) -> Path:
    """Load the checkpoint's EMA model and write it with its configuration to `config.out`.

    **Arguments:**
    - `config`: which checkpoint and where to write.

    **Returns:** the path written.
    """
    model, experiment, step = load_ema_model(config.checkpoint)
    out = export_model(model, experiment, step, config.out)
    size = out.stat().st_size / 2**20
    print(
        f"Wrote the EMA model at step {step} ({size:.1f} MiB) and its "
        f"experiment configuration to {out}; sample from it with python -m fsdm_eqx.sample "
        f"--checkpoint {out}.",
        flush=True,
    )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """The command line ``python -m fsdm_eqx.export``; every `ExportConfig` field is a flag.

    **Arguments:**
    - `argv`: the arguments (default ``sys.argv[1:]``).
    """
    run_config_cli(
        ExportConfig,
        run_export,
        argv,
        description="Export the EMA model of a checkpoint and its configuration to one .npz.",
        errors=(ValueError, CheckpointError, OSError),
    )


if __name__ == "__main__":
    main()
