"""The Omniglot and MNIST scripts start, train and evaluate at the smallest settings.

The model, optimiser, evaluation and run settings come from the `smoke` preset and are passed as
command-line overrides on top of each script's own preset, so its data path is the one tested.
"""

import contextlib
import dataclasses
import io
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fsdm_eqx.experiment import PRESETS
from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


def _flags(prefix: str, small: Any, base: Any, *, keep: tuple[str, ...] = ()) -> list[str]:
    """Command-line flags that turn config `base` into `small` (fields in `keep` untouched)."""
    out: list[str] = []
    for field in dataclasses.fields(small):
        value = getattr(small, field.name)
        if field.name in keep or value == getattr(base, field.name):
            continue
        name = field.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{prefix}.{name}" if value else f"--{prefix}.no-{name}")
        elif isinstance(value, tuple):
            out += [f"--{prefix}.{name}", *map(str, value)]
        else:
            out += [f"--{prefix}.{name}", str(value)]
    return out


def _smallest(preset: str, run_dir: Path) -> list[str]:
    smoke, base = PRESETS["smoke"], PRESETS[preset]
    run = dataclasses.replace(
        smoke.run, num_steps=2, log_every=1, save_every=2, eval_every=2, sample_every=2
    )
    keep_model = ("channels", "image_size", "encoder_patch_size")
    return [
        *_flags("model", smoke.model, base.model, keep=keep_model),
        *_flags("diffusion", smoke.diffusion, base.diffusion),
        *_flags("optim", smoke.optim, base.optim),
        *_flags("eval", smoke.eval, base.eval, keep=("inception_weights",)),
        *_flags("run", run, base.run, keep=("run_dir", "wandb")),
        "--data.batch-size", "2", "--data.prefetch", "0", "--data.no-download",
        "--eval-loss-batches", "1", "--grid-sets", "2", "--visual-sets", "1",
        "--eval.inception-weights",
        shared_path("weights", "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz"),
        "--run.run-dir", str(run_dir), "--run.wandb", "disabled", "--run.no-progress",
    ]  # fmt: skip


_OMNIGLOT_SMALL = [
    "--data.omniglot-subsets", "background_small1", "background_small2",
    "--data.class-split", "random",
]  # fmt: skip


@pytest.mark.parametrize(
    ("script", "preset", "data"),
    [
        (
            "omniglot_fewshot.py",
            "omniglot",
            lambda: [*_OMNIGLOT_SMALL, "--data.data-dir", shared_path("data", "omniglot")],
        ),
        (
            "mnist_fewshot.py",
            "mnist",
            lambda: ["--data.data-dir", shared_path("data", "mnist", "mnist_test.npz")],
        ),
    ],
)
def test_script_trains_and_evaluates(
    script: str, preset: str, data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [script, *data(), *_smallest(preset, tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(str(ROOT / "experiments" / script), run_name="__main__")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 2
    for name in ("eval_loss", "fid", "train/loss"):
        assert np.isfinite(metrics[name]), name
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["experiment"]["data"]["dataset"] == PRESETS[preset].data.dataset
    assert config["experiment"]["model"]["channels"] == 1
