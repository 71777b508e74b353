"""Resuming a run directory only with the model and data its checkpoint was trained on.

A checkpoint records the experiment configuration it was written with. Resuming it with another
model, diffusion process or data stream would silently continue a different experiment (or fail
deep inside the restore), so `check_resume_compatible` compares those sections field by field and
refuses the change unless `RunConfig.resume_anyway` is set.

Everything else may change on a resume: the run length (a longer run is the normal way to train
further), logging, evaluation and checkpoint intervals, the evaluation protocol, and the optimiser
(a lower learning rate or a new EMA decay for the rest of the run is a deliberate choice; an
optimiser state that no longer fits is refused by `restore_checkpoint` itself).
"""

import dataclasses
import json
import warnings
from typing import Any

from ..config import DataConfig, DiffusionConfig, ModelConfig
from ..train.checkpoint import CheckpointError
from .config import ExperimentConfig

__all__ = ["RESUME_CHECKED", "ResumeConfigError", "check_resume_compatible"]

RESUME_CHECKED: dict[str, tuple[type, frozenset[str]]] = {
    "model": (ModelConfig, frozenset({"remat"})),
    "diffusion": (
        DiffusionConfig,
        frozenset(
            {
                "sampling_steps",
                "sampler",
                "ddim_eta",
                "ode_rtol",
                "ode_atol",
                "ode_max_steps",
                "clip_denoised",
                "guidance_scale",
            }
        ),
    ),
    "data": (
        DataConfig,
        frozenset({"data_dir", "cache_dir", "download", "prefetch", "workers"}),
    ),
}
"""The sections a resume must keep, each with its class and the fields that may still change:
`model.remat` (the same computation, recomputed in the backward pass), the diffusion's sampler
settings (they shape generated images, not training), and where the data is read from and how
fast (the same images in the same stream). Every other field of these sections is checked."""


class ResumeConfigError(CheckpointError):
    """A run directory resumed with another model, diffusion or data configuration."""


def _default(cls: type, name: str) -> Any:
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None:
        return None
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _json(value: Any) -> Any:
    """The value as it reads back from a checkpoint's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def check_resume_compatible(
    stored: dict[str, Any], new: ExperimentConfig, *, anyway: bool = False
) -> list[str]:
    """Check that resuming a checkpoint written with ``stored`` under ``new`` keeps the model,
    the diffusion process and the data (the fields `RESUME_CHECKED` names).

    A field that the stored configuration lacks (a checkpoint of an earlier version) counts as
    its default; a stored field the current configs no longer have is not compared, and a
    section the checkpoint does not record at all is not checked.

    **Arguments:**
    - `stored`: the ``experiment`` entry of the checkpoint's metadata.
    - `new`: the configuration of the resumed run.
    - `anyway`: warn about the differences instead of refusing them (`RunConfig.resume_anyway`).

    **Returns:** one ``section.field old -> new`` entry per difference (empty when compatible).

    **Raises:** `ResumeConfigError` naming every differing field with its old and new value and
    how to proceed, unless ``anyway``.
    """
    differences: list[str] = []
    for section, (cls, allowed) in RESUME_CHECKED.items():
        old_values = stored.get(section)
        if not isinstance(old_values, dict):
            continue
        new_values = _json(dataclasses.asdict(getattr(new, section)))
        for name, value in new_values.items():
            if name in allowed:
                continue
            old = old_values[name] if name in old_values else _json(_default(cls, name))
            if old != value:
                differences.append(f"{section}.{name} {old!r} -> {value!r}")
    if not differences:
        return differences
    listing = "; ".join(differences)
    where = new.run.run_dir
    if anyway:
        warnings.warn(
            f"Resuming {where} with a model, diffusion or data configuration other than its "
            f"checkpoint's, as --run.resume-anyway asks (checkpoint -> now: {listing}).",
            stacklevel=2,
        )
        return differences
    raise ResumeConfigError(
        f"The checkpoint in {where} was trained with another model, diffusion or data "
        f"configuration (checkpoint -> now: {listing}); resume it with its own settings, pass "
        "--run.resume-anyway to continue it with these changes, or train in a new --run.run-dir."
    )
