"""The few-shot experiment: CLI generated from the configs, the smoke preset end to end, resume."""

import contextlib
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fsdm_eqx.data import load_dataset, make_sampler
from fsdm_eqx.experiment import PRESETS, ExperimentConfig, main
from fsdm_eqx.sample import load_ema_model
from fsdm_eqx.train import fsdm_loss_fn, latest_checkpoint
from tests.conftest import shared_path
from tests.test_instrument_wandb import _history


def _smoke_args(run_dir: Path) -> list[str]:
    data = shared_path("data", "cifar100", "cifar100_subset.npz")
    weights = shared_path("weights", "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz")
    return [
        "--preset", "smoke",
        "--data-dir", str(data),
        "--data.no-download",
        "--eval.inception-weights", str(weights),
        "--run.run-dir", str(run_dir),
        "--run.no-progress",
        "--data.cache-dir", str(run_dir.parent / f"{run_dir.name}-cache"),
    ]  # fmt: skip


NO_EVALUATION = ["--no-fid", "--no-probe", "--no-likelihood", "--visual-sets", "0",
                 "--run.sample-every", "0"]  # fmt: skip
"""Flags that leave every evaluation and sample out of a (resumed) smoke run."""


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, str]:
    run_dir = tmp_path_factory.mktemp("smoke")
    args = _smoke_args(run_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return args, run_dir, out.getvalue()


def test_smoke_end_to_end(smoke_run: tuple[list[str], Path, str]) -> None:
    _, run_dir, _ = smoke_run
    smoke = PRESETS["smoke"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == smoke.run.num_steps
    assert metrics["resumed_from"] == 0
    for name in ("train/loss", "eval_loss", "fid", "kid_mean", "precision", "recall"):
        assert np.isfinite(metrics[name]), name
    assert metrics["fid"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 0 <= metrics["probe_accuracy"] <= metrics["probe_top5_accuracy"] <= 1
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
    assert [line["step"] for line in lines if "loss" in line] == [5, 10]
    assert any("eval_loss" in line for line in lines)
    assert latest_checkpoint(run_dir) is not None


def test_smoke_eval_loss_is_the_ema_models_validation_loss(
    smoke_run: tuple[list[str], Path, str],
) -> None:
    """The logged eval_loss, recomputed from the final checkpoint's EMA weights on the same
    validation sets: the mean of the per-set training loss in evaluation mode."""
    _, run_dir, _ = smoke_run
    ema, config, step = load_ema_model(run_dir)
    assert step == config.run.num_steps and ema.inference
    data, split = load_dataset(config.data)
    val = dataclasses.replace(config.data, split="val", flips=False, prefetch=0)
    sampler = make_sampler(val, data, split)
    eval_key = jax.random.split(jax.random.PRNGKey(config.run.seed), 3)[2]
    loss_fn = eqx.filter_jit(jax.vmap(fsdm_loss_fn(config.diffusion), in_axes=(None, 0, 0)))
    losses = []
    for i in range(config.eval_loss_batches):
        sets = jnp.asarray(sampler.batch(i)[0])
        keys = jax.random.split(jax.random.fold_in(eval_key, i), sets.shape[0])
        losses.append(np.asarray(loss_fn(ema, sets, keys)[0], np.float64).mean())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    np.testing.assert_allclose(metrics["eval_loss"], np.mean(losses), rtol=1e-5)


def test_smoke_logs_images_visuals_and_wandb_offline(
    smoke_run: tuple[list[str], Path, str],
) -> None:
    _, run_dir, _ = smoke_run
    smoke = PRESETS["smoke"]
    images = {p.name for p in (run_dir / "images").glob("*.png")}
    every = smoke.run.sample_every
    for step in range(every, smoke.run.num_steps + 1, every):
        for i in range(smoke.grid_sets):
            assert f"train_support_target_set_{i}_{step:08d}.png" in images
            assert f"generation_set_{i}_{step:08d}.png" in images
    end = f"{smoke.run.num_steps:08d}"
    for i in range(smoke.grid_sets):
        assert f"fid_eval_example_{i}_{end}.png" in images
    for i in range(smoke.visual_sets):
        for name in (f"encoder_rollout_set{i}", f"encoder_saliency_set{i}",
                     f"encoder_attention_layer0_head0_set{i}"):  # fmt: skip
            assert f"{name}_{end}.png" in images, name
    assert f"encoder_position_similarity_{end}.png" in images
    assert f"samples_grid_{end}.png" in images
    # The final grid sent to the sinks is samples.png.
    np.testing.assert_array_equal(
        np.asarray(Image.open(run_dir / "images" / f"samples_grid_{end}.png")),
        np.asarray(Image.open(run_dir / "samples.png")),
    )
    assert list((run_dir / "histograms").glob("params_*"))
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "final/fid" in r]
    assert final and final[0]["final/fid"] == pytest.approx(
        json.loads((run_dir / "metrics.json").read_text())["fid"]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The final protocol's record; the FID curve's points come with an evaluation's eval_loss.
    (scores,) = [r for r in records if "fid" in r and "eval_loss" not in r]
    assert scores["fid"] == pytest.approx(metrics["fid"])
    # One name per figure: W&B and metrics.json both say kid_mean (and no bare kid).
    for name in ("kid_mean", "kid_std", "precision", "recall"):
        assert scores[name] == pytest.approx(metrics[name]), name
    assert "kid" not in scores and "kid" not in metrics
    logged = {key for row in _history(run_dir).values() for key in row}
    assert {"fid", "kid_mean", "kid_std"} <= logged and "kid" not in logged
    names = json.loads((run_dir / "config.json").read_text())["class_split"]["test"]
    per_class = {k.removeprefix("fid/") for k in scores if k.startswith("fid/")}
    assert per_class and per_class <= set(names)
    probe = [r for r in records if "probe_accuracy" in r]
    assert [r["step"] for r in probe] == [10, 10]  # at the evaluation and at the end
    assert probe[-1]["probe_accuracy"] == pytest.approx(metrics["probe_accuracy"])
    accuracies = {k.removeprefix("Val/per_class_accuracy/"): v for k, v in probe[-1].items()
                  if k.startswith("Val/per_class_accuracy/")}  # fmt: skip
    assert set(accuracies) == set(names) and all(0 <= v <= 1 for v in accuracies.values())
    confusion = json.loads((run_dir / "tables" / f"Val_confusion_matrix_{end}.json").read_text())
    assert confusion["columns"][0] == "true" and set(confusion["columns"][1:]) == set(names)
    counts = np.array([row[1:] for row in confusion["rows"]])
    per_class_total = counts.sum(axis=1)
    assert np.all(per_class_total == per_class_total[0])  # as many queries for every class
    diagonal = {row[0]: row[1 + i] / per_class_total[i] for i, row in enumerate(confusion["rows"])}
    assert diagonal == pytest.approx(accuracies)
    assert {"Val/per_class_accuracy/" + names[0], "Val/confusion_matrix/counts/_type"} <= logged


def test_smoke_quality_curve_best_checkpoint_and_extra_figures(
    smoke_run: tuple[list[str], Path, str],
) -> None:
    _, run_dir, _ = smoke_run
    smoke = PRESETS["smoke"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    names = json.loads((run_dir / "config.json").read_text())["class_split"]
    # The FID curve: at every evaluation, on the fixed curve sets, with its cost.
    (curve,) = [r for r in records if "fid" in r and "eval_loss" in r]
    assert curve["step"] == smoke.run.eval_every and np.isfinite(curve["fid"])
    assert curve["fid_seconds"] > 0 and np.isfinite(curve["kid_mean"])
    assert {k.removeprefix("fid/") for k in curve if k.startswith("fid/")} <= set(names["test"])
    # The best evaluation's checkpoint, under best/ (monitored on fid).
    (best,) = (run_dir / "best").glob("step_*")
    assert json.loads((best / "metadata.json").read_text())["early_stopping"]["monitor"] == "fid"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Training classes too, labelled in-distro.
    assert np.isfinite(metrics["fid_in_distro"])
    assert metrics["fid_in_distro_detail"]["distro"] == "in-distro"
    in_distro = {k.removeprefix("fid_in_distro/") for r in records for k in r
                 if k.startswith("fid_in_distro/")}  # fmt: skip
    assert in_distro and in_distro <= set(names["train"])
    # Bits/dim of unseen-class images under their leave-one-out contexts.
    assert 0 < metrics["likelihood/bpd"] < 100 and metrics["likelihood/bpd_sem"] >= 0
    assert any("likelihood/bpd" in r for r in records)
    # Sample diversity beside the real sets' figure.
    assert metrics["diversity"] >= 0 and metrics["diversity_real"] > 0
    # The real images' Inception statistics were cached, keyed by dataset and split.
    cache = run_dir.parent / f"{run_dir.name}-cache" / "reference_statistics"
    tags = {p.name.rsplit("-", 2)[0] for p in cache.glob("*.npz")}
    assert tags == {"cifar100-test", "cifar100-train"}


def test_summary_table_leaves_out_debug_metrics(smoke_run: tuple[list[str], Path, str]) -> None:
    _, run_dir, printed = smoke_run
    table = printed[printed.index("metric ") :]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(k.startswith("train/debug/") for k in metrics)  # they are in metrics.json ...
    assert "debug" not in table and "system" not in table  # ... but not in the summary
    labels = ("few-shot FID, unseen classes", "training loss", "EMA loss", "precision", "recall",
              "KID (mean)", "probe accuracy", "steps trained", "training time")  # fmt: skip
    for label in labels:
        assert label in table, label
    assert f"{metrics['fid']:.6g}" in table


def test_sample_cli_on_the_smoke_run(
    smoke_run: tuple[list[str], Path, str], tmp_path: Path
) -> None:
    from fsdm_eqx.sample import main as sample_main

    _, run_dir, _ = smoke_run
    support = tmp_path / "support"
    support.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate((32, 64, 48)):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(support / f"{i}.png")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(run_dir), "--support-dir", str(support), "--out-dir", str(out),
            "--num", "2", "--steps", "2", "--columns", "3"]  # fmt: skip
    sample_main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_000.png", "sample_001.png"]
    assert np.asarray(Image.open(out / "sample_001.png")).shape == (32, 32, 3)
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 34 + 2, 3 * 34 + 2, 3)


def test_rerun_resumes(smoke_run: tuple[list[str], Path, str]) -> None:
    args, run_dir, _ = smoke_run
    steps = PRESETS["smoke"].run.num_steps
    main([*args, *NO_EVALUATION, "--run.num-steps", str(steps + 5), "--run.wandb", "disabled"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == steps
    assert metrics["step"] == steps + 5
    assert "fid" not in metrics and "probe_accuracy" not in metrics
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(5, steps + 6, 5))


def _overwrite_a_few_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[1:5] = b"}{!x"  # as a disk or an editor might: the JSON is no longer valid
    path.write_bytes(bytes(data))


def test_rerun_skips_a_damaged_checkpoint(
    smoke_run: tuple[list[str], Path, str], tmp_path: Path
) -> None:
    _, run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    steps = sorted(int(p.name[len("step_") :]) for p in copy.glob("step_*"))
    newest = copy / f"step_{steps[-1]:08d}"
    _overwrite_a_few_bytes(newest / "metadata.json")
    argv = [*_smoke_args(copy), *NO_EVALUATION, "--run.wandb", "disabled"]
    with pytest.warns(UserWarning, match="damaged") as caught:
        main([*argv, "--run.num-steps", str(steps[-1])])
    assert any(str(newest / "metadata.json") in str(w.message) for w in caught)
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["resumed_from"] == steps[-2] and metrics["step"] == steps[-1]


def test_only_damaged_checkpoints_are_a_one_line_error(tmp_path: Path) -> None:
    damaged = tmp_path / "run" / "step_00000005"
    damaged.mkdir(parents=True)
    (damaged / "metadata.json").write_text('{"step": 5, "state_sha256": "00"')
    (damaged / "state.eqx").write_bytes(b"\0" * 8)
    with pytest.raises(SystemExit) as info:
        main(_smoke_args(tmp_path / "run"))
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert str(damaged / "metadata.json") in message and "delete them" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_resume_refuses_another_model_unless_told(
    smoke_run: tuple[list[str], Path, str], tmp_path: Path
) -> None:
    _, run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = max(int(p.name[len("step_") :]) for p in copy.glob("step_*"))
    written = (copy / "config.json").read_text()
    argv = [*_smoke_args(copy), *NO_EVALUATION, "--run.wandb", "disabled",
            "--run.num-steps", str(newest), "--model.encoder-dropout", "0.1"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "model.encoder_dropout 0.0 -> 0.1" in message and "--run.resume-anyway" in message
    assert (copy / "config.json").read_text() == written  # refused before anything is rewritten
    with pytest.warns(UserWarning, match="model.encoder_dropout 0.0 -> 0.1"):
        main([*argv, "--run.resume-anyway"])
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["resumed_from"] == newest


def test_help_lists_fields_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flags = ("--preset", "--run.run-dir", "--run.num-steps", "--model.denoiser",
             "--diffusion.num-steps", "--optim.lr", "--data.data-dir", "--data-dir",
             "--cache-dir", "--eval.inception-weights", "--run.wandb", "--run.sample-every",
             "--no-fid", "--no-probe", "--grid-sets", "--visual-sets")  # fmt: skip
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
    assert paper.model.denoiser == "unet" and not paper.model.variational
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


def test_flags_named_in_error_messages_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``--flag`` that the library's messages tell the user to pass is a real flag."""
    from fsdm_eqx.export import main as export_main
    from fsdm_eqx.sample import main as sample_main

    helps = ""
    for entry in (main, sample_main, export_main):
        with pytest.raises(SystemExit):
            entry(["--help"])
        helps += capsys.readouterr().out
    package = Path(__file__).resolve().parent.parent / "fsdm_eqx"
    named = set()
    for path in package.rglob("*.py"):
        named |= {m.rstrip(".") for m in re.findall(r"--[a-z][a-z0-9.-]*", path.read_text())}
    assert {"--data-dir", "--no-fid", "--support-dir"} <= named
    for flag in sorted(named):
        assert re.search(re.escape(flag) + r"\b", helps), flag
