"""Resuming a run directory: the model, diffusion and data it was trained with must not change
(unless the user insists), while run length, logging, evaluation and optimiser settings may."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from fsdm_eqx.config import DataConfig, DiffusionConfig, EvalConfig, OptimConfig, RunConfig
from fsdm_eqx.experiment import PRESETS, ExperimentConfig
from fsdm_eqx.experiment.resume import (
    RESUME_CHECKED,
    ResumeConfigError,
    check_resume_compatible,
)
from fsdm_eqx.train.checkpoint import CheckpointError

SMOKE = PRESETS["smoke"]


def _stored(config: ExperimentConfig) -> dict[str, Any]:
    """The configuration as a checkpoint's metadata holds it (JSON: tuples are lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def test_allowed_changes_resume_silently() -> None:
    """A longer run, other logging, evaluation and optimiser settings, another data location and
    sampler settings keep the trained model and its data: no error, no warning."""
    new = dataclasses.replace(
        SMOKE,
        run=RunConfig(run_dir="elsewhere", num_steps=50, log_every=1, seed=3, wandb="disabled"),
        optim=OptimConfig(lr=3e-4, ema_decay=0.99, lr_schedule="cosine"),
        eval=EvalConfig(num_sets=4, sampler="ddim"),
        data=dataclasses.replace(SMOKE.data, data_dir="/copy", prefetch=4, workers=3),
        diffusion=dataclasses.replace(SMOKE.diffusion, sampler="ode", sampling_steps=5),
        model=dataclasses.replace(SMOKE.model, remat=True),
        fid=False,
        grid_sets=2,
    )
    assert check_resume_compatible(_stored(SMOKE), new) == []


def test_every_changed_field_is_named_with_both_values() -> None:
    new = dataclasses.replace(
        SMOKE,
        model=dataclasses.replace(SMOKE.model, dit_depth=3, encoder_dropout=0.1),
        diffusion=DiffusionConfig(num_steps=200, sampling_steps=10),
        data=DataConfig(dataset="cifar100", class_split="random", batch_size=8, prefetch=0),
    )
    with pytest.raises(ResumeConfigError) as info:
        check_resume_compatible(_stored(SMOKE), new)
    message = str(info.value)
    assert isinstance(info.value, CheckpointError) and "\n" not in message
    for part in ("model.dit_depth 2 -> 3", "model.encoder_dropout 0.0 -> 0.1",
                 "diffusion.num_steps 100 -> 200", "data.class_split 'fc100' -> 'random'",
                 "data.batch_size 4 -> 8", "--run.resume-anyway", "--run.run-dir",
                 SMOKE.run.run_dir):  # fmt: skip
        assert part in message, part
    assert "prefetch" not in message  # a harmless field, changed here too


def test_resume_anyway_warns_and_returns_the_differences() -> None:
    new = dataclasses.replace(SMOKE, model=dataclasses.replace(SMOKE.model, hdim=64))
    with pytest.warns(UserWarning, match=r"--run.resume-anyway .*model.hdim 32 -> 64"):
        differences = check_resume_compatible(_stored(SMOKE), new, anyway=True)
    assert differences == ["model.hdim 32 -> 64"]


def test_tuples_fields_missing_from_old_checkpoints_and_unknown_fields() -> None:
    unet = dataclasses.replace(SMOKE.model, denoiser="unet", unet_channel_mult=(1, 2))
    config = dataclasses.replace(SMOKE, model=unet)
    stored = _stored(config)
    # A checkpoint of an earlier version: a field it did not record counts as its default, a
    # field this version no longer has is not compared, and the JSON lists equal the tuples.
    del stored["model"]["dit_gate_bias"]
    stored["model"]["retired_option"] = 1
    del stored["diffusion"]
    assert check_resume_compatible(stored, config) == []
    changed = dataclasses.replace(config, model=dataclasses.replace(unet, dit_gate_bias=1.0))
    with pytest.raises(ResumeConfigError, match=r"model.dit_gate_bias 0.0 -> 1.0"):
        check_resume_compatible(stored, changed)
    assert check_resume_compatible({}, changed) == []  # no recorded configuration: nothing to check


def test_the_allowed_fields_exist() -> None:
    """Every field `RESUME_CHECKED` lets change is a field of its section's config."""
    for section, (cls, allowed) in RESUME_CHECKED.items():
        assert cls is type(getattr(ExperimentConfig(), section))
        assert allowed <= {f.name for f in dataclasses.fields(cls)}, section
