"""The few-shot experiment: CLI generated from the configs, the smoke preset end to end, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdm_eqx.experiment import PRESETS, ExperimentConfig, main
from fsdm_eqx.train import latest_checkpoint
from tests.conftest import shared_path


def _smoke_args(run_dir: Path) -> list[str]:
    data = shared_path("data", "cifar100", "cifar100_subset.npz")
    weights = shared_path("weights", "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz")
    return [
        "--preset", "smoke",
        "--data.data-dir", str(data),
        "--data.no-download",
        "--eval.inception-weights", str(weights),
        "--run.run-dir", str(run_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    run_dir = tmp_path_factory.mktemp("smoke")
    args = _smoke_args(run_dir)
    main(args)
    return args, run_dir


def test_smoke_end_to_end(smoke_run: tuple[list[str], Path]) -> None:
    _, run_dir = smoke_run
    smoke = PRESETS["smoke"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == smoke.run.num_steps
    assert metrics["resumed_from"] == 0
    for name in ("train/loss", "eval_loss", "fid", "kid_mean", "precision", "recall"):
        assert np.isfinite(metrics[name]), name
    assert metrics["fid"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    detail = metrics["fid_detail"]
    assert detail["distro"] == "out-distro"
    config = json.loads((run_dir / "config.json").read_text())
    # FID classes are the unseen test classes of the split, disjoint from training classes.
    names = config["class_split"]
    assert set(names["test"]).isdisjoint(names["train"])
    assert len(detail["classes"]) >= 1
    assert detail["num_generated"] == smoke.eval.num_sets * smoke.eval.samples_per_set
    assert config["experiment"]["run"]["num_steps"] == smoke.run.num_steps
    assert config["experiment"]["model"] == json.loads(json.dumps(vars(smoke.model)))
    grid = np.asarray(Image.open(run_dir / "samples.png"))
    # Two rows (support, generated) of 32-pixel images per set, 2-pixel borders.
    assert grid.shape == (2 * smoke.grid_sets * 34 + 2, smoke.eval.ns * 34 + 2, 3)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(5, smoke.run.num_steps + 1, 5))
    assert latest_checkpoint(run_dir) is not None


def test_rerun_resumes(smoke_run: tuple[list[str], Path]) -> None:
    args, run_dir = smoke_run
    steps = PRESETS["smoke"].run.num_steps
    main([*args, "--no-fid", "--run.num-steps", str(steps + 5)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == steps
    assert metrics["step"] == steps + 5
    assert "fid" not in metrics
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(5, steps + 6, 5))


def test_help_lists_fields_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flags = ("--preset", "--run.run-dir", "--run.num-steps", "--model.denoiser",
             "--diffusion.num-steps", "--optim.lr", "--data.data-dir",
             "--eval.inception-weights")  # fmt: skip
    for flag in flags:
        assert flag in out, flag
    assert "default: unet" in out  # the paper preset's denoiser
    assert "Side of the DiT's square patches" in out  # field docstrings become help


def test_preset_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--help"])
    out = capsys.readouterr().out
    assert "default: dit" in out
    paper = PRESETS["paper-cifar100"]
    assert paper.model.denoiser == "unet" and paper.model.variational
    assert paper.diffusion.num_steps == 1000 and paper.diffusion.schedule == "linear"
    assert paper.diffusion.learned_variance
    assert paper.optim.lr == 1e-4 and paper.optim.ema_decay == 0.995
    assert (paper.data.batch_size, paper.data.ns) == (32, 6)
    default = ExperimentConfig()
    for part in ("model", "diffusion", "optim", "data", "eval"):
        assert getattr(default, part) == getattr(paper, part), part


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "--preset 'nope' is not known"),
        (["--preset", "smoke", "--diffusion.schedule", "quadratic"], "quadratic"),
        (["--preset", "smoke", "--optim.lr", "-1"], "OptimConfig.lr=-1.0 is not allowed"),
        (["--preset", "smoke", "--data.ns", "4"], "model.ns=6 but data.ns=4"),
    ],
)
def test_bad_values(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    text = str(info.value.code) + capsys.readouterr().err
    assert message in text


def test_missing_data_is_one_sentence(tmp_path: Path) -> None:
    argv = ["--preset", "smoke", "--data.data-dir", str(tmp_path / "absent.npz"),
            "--data.no-download", "--run.run-dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert str(info.value.code).startswith("error: ")
    assert "\n" not in str(info.value.code)


def test_missing_inception_weights_fail_before_training(tmp_path: Path) -> None:
    argv = ["--preset", "smoke", "--eval.inception-weights", str(tmp_path / "absent.npz"),
            "--run.run-dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "--no-fid" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
