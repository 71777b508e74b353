"""The training loop: logging, evaluation, the image and visuals hooks, resume (in process and
after SIGKILL), the guard, early stopping, the sinks and RunConfig."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import numpy as np
import pytest
from PIL import Image

from fsdm_eqx.config import OptimConfig, RunConfig
from fsdm_eqx.instrument import ConsoleSink, JsonlSink, MultiSink, Sink, Visuals
from fsdm_eqx.train import (
    BEST_DIR,
    CheckpointError,
    NonFiniteError,
    TrainState,
    latest_checkpoint,
    restore_checkpoint,
    train,
)
from tests.helpers import RecordingSink
from tests.train_fixtures import TOTAL_STEPS, fresh_state, loop_batch, make_tiny_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def nan_at(bad_step: int):
    def fn(step: int) -> np.ndarray:
        batch = loop_batch(step)
        return batch * np.float32(np.nan) if step == bad_step else batch

    return fn


def run(tmp_path, step_fn, batches=loop_batch, sink=None, eval_fn=None, hooks=None, **overrides):
    fields = (
        dict(
            run_dir=str(tmp_path),
            num_steps=6,
            log_every=3,
            eval_every=0,
            save_every=4,
            progress=False,
        )
        | overrides
    )
    return train(
        fresh_state(),
        step_fn,
        batches,
        config=RunConfig(**fields),
        sink=sink if sink is not None else RecordingSink(),
        eval_fn=eval_fn,
        metadata={"experiment": "test"},
        **(hooks or {}),
    )


def leaves(state: TrainState) -> list[np.ndarray]:
    state = eqx.tree_at(lambda s: s.key, state, jax.random.key_data(state.key))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))]


def test_logs_evaluates_and_saves(tmp_path, step_fn):
    sink = RecordingSink()
    evaluated: list[int] = []

    def eval_fn(state):
        evaluated.append(int(state.step))
        return {"eval_loss": 1.0}

    state = run(tmp_path, step_fn, sink=sink, eval_fn=eval_fn, eval_every=2)
    assert int(state.step) == 6 and evaluated == [2, 4, 6]
    train_logs = [(s, m) for s, m in sink.logs if "loss" in m]
    assert [s for s, _ in train_logs] == [3, 6]
    for step, metrics in train_logs:
        assert metrics["progress/percent_complete"] == pytest.approx(100 * step / 6)
        assert metrics["system/images_per_second"] == pytest.approx(
            40 * metrics["system/steps_per_second"]
        )
        assert metrics["debug/nonfinite"] == 0.0 and np.isfinite(metrics["loss"])
    assert train_logs[-1][1]["progress/eta_seconds"] == 0.0
    assert [m["eval_loss"] for _, m in sink.logs if "eval_loss" in m] == [1.0] * 3
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000006"]
    _, metadata = restore_checkpoint(tmp_path, like=state)
    assert metadata["sampler_position"] == 6 and metadata["experiment"] == "test"
    assert metadata["run_config"]["num_steps"] == 6 and metadata["run_config"]["save_every"] == 4


def test_images_visuals_and_system_metrics(tmp_path, step_fn):
    sink = RecordingSink()
    grid = np.full((4, 6, 3), 7, np.uint8)
    weights = np.linspace(-1.0, 1.0, 11)
    sampled: list[int] = []
    visualised: list[int] = []

    def images_fn(state):
        sampled.append(int(state.step))
        return {"generation/set_0": grid}

    def visuals_fn(state):
        visualised.append(int(state.step))
        return Visuals({"encoder/rollout_set0": grid}, {"params/encoder": weights}, {"probe": 0.5})

    hooks = dict(images_fn=images_fn, visuals_fn=visuals_fn)
    run(tmp_path, step_fn, sink=sink, hooks=hooks, num_steps=6, sample_every=2, eval_every=3)
    assert sampled == [2, 4, 6] and visualised == [3, 6]
    assert [(s, sorted(i)) for s, i in sink.images] == [
        (2, ["generation/set_0"]),
        (3, ["encoder/rollout_set0"]),
        (4, ["generation/set_0"]),
        (6, ["generation/set_0"]),
        (6, ["encoder/rollout_set0"]),
    ]
    assert all(np.array_equal(i, grid) for _, images in sink.images for i in images.values())
    assert [s for s, _ in sink.histograms] == [3, 6]
    assert all(np.array_equal(h["params/encoder"], weights) for _, h in sink.histograms)
    assert [(s, m) for s, m in sink.logs if "probe" in m] == [
        (3, {"probe": 0.5}),
        (6, {"probe": 0.5}),
    ]

    stats = jax.local_devices()[0].memory_stats()
    for _, metrics in (entry for entry in sink.logs if "loss" in entry[1]):
        assert metrics["system/steps_per_second"] > 0
        if stats is None or "bytes_in_use" not in stats:
            assert "system/memory_in_use_bytes" not in metrics
        else:
            assert metrics["system/memory_in_use_bytes"] > 0
        if stats is None or "peak_bytes_in_use" not in stats:
            assert "system/memory_peak_bytes" not in metrics
        else:
            assert metrics["system/memory_peak_bytes"] >= metrics["system/memory_in_use_bytes"]

    # sample_every=0 and eval_every=0 never call the hooks.
    sampled.clear()
    visualised.clear()
    run(tmp_path / "never", step_fn, hooks=hooks, num_steps=4, sample_every=0, eval_every=0)
    assert sampled == [] and visualised == []


def test_resume_continues_exactly(tmp_path, step_fn, capsys):
    straight = run(tmp_path / "straight", step_fn, num_steps=10)
    run(tmp_path / "resumed", step_fn, num_steps=6)
    capsys.readouterr()
    resumed = run(tmp_path / "resumed", step_fn, num_steps=10)
    assert "Resuming from" in capsys.readouterr().err
    assert int(resumed.step) == 10
    for a, b in zip(leaves(resumed), leaves(straight), strict=True):
        assert np.array_equal(a, b)


COSINE = OptimConfig(lr=1e-2, lr_schedule="cosine", ema_start=0, ema_every=1)


def _cosine_lrs(run_dir: pathlib.Path, num_steps: int, total_steps: int) -> dict[int, float]:
    """The logged learning rate of each step of a cosine run as the main job builds it."""
    state = fresh_state(COSINE, total_steps)
    sink = RecordingSink()
    train(
        state,
        make_tiny_step(COSINE, total_steps),
        loop_batch,
        config=RunConfig(
            run_dir=str(run_dir),
            num_steps=num_steps,
            log_every=1,
            eval_every=0,
            save_every=4,
            progress=False,
        ),
        sink=sink,
    )
    return {step: metrics["Optim/lr"] for step, metrics in sink.logs}


def test_resume_with_more_steps_keeps_the_lr_schedule(tmp_path):
    straight = _cosine_lrs(tmp_path / "straight", num_steps=8, total_steps=8)
    _cosine_lrs(tmp_path / "resumed", num_steps=4, total_steps=8)
    with pytest.warns(UserWarning, match="schedule") as caught:
        resumed = _cosine_lrs(tmp_path / "resumed", num_steps=12, total_steps=16)
    assert "8" in str(caught[0].message) and "16" in str(caught[0].message)
    # No jump at the resumed step: the schedule still ends at step 8 and stays at 0 after it.
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
    assert straight[5] > 0 and [resumed[s] for s in range(9, 13)] == [0.0] * 4


def _damage(checkpoint: pathlib.Path, part: str) -> pathlib.Path:
    """Truncate the state file or overwrite a few bytes of the metadata; returns the file."""
    if part == "state":
        path = checkpoint / "state.eqx"
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path = checkpoint / "metadata.json"
        data = bytearray(path.read_bytes())
        data[1:5] = b"}{!x"  # the JSON is no longer valid
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("part", ["state", "metadata"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, step_fn, capsys, part):
    straight = run(tmp_path / "straight", step_fn, num_steps=10)
    run(tmp_path / "resumed", step_fn, num_steps=8)
    newest = tmp_path / "resumed" / "step_00000008"
    damaged = _damage(newest, part)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="damaged") as caught:
        resumed = run(tmp_path / "resumed", step_fn, num_steps=10)
    assert str(damaged) in str(caught[0].message) or str(newest) in str(caught[0].message)
    assert f"Resuming from {tmp_path / 'resumed' / 'step_00000004'}" in capsys.readouterr().err
    for a, b in zip(leaves(resumed), leaves(straight), strict=True):
        assert np.array_equal(a, b)


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path, step_fn):
    run(tmp_path, step_fn, num_steps=4)
    damaged = _damage(tmp_path / "step_00000004", "state")
    with pytest.raises(CheckpointError) as error:
        run(tmp_path, step_fn, num_steps=6)
    message = str(error.value)
    assert str(damaged) in message and "delete" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004"]


def test_progress_bar(tmp_path, step_fn, capsys):
    run(tmp_path, step_fn, num_steps=3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "step/s" in err and "loss=" in err and "img_s=" in err


def test_nonfinite_loss_stops_naming_the_step(tmp_path, step_fn):
    with pytest.raises(NonFiniteError, match=r"step 7 .*loss=nan") as error:
        run(tmp_path, step_fn, batches=nan_at(7), num_steps=12, save_every=5)
    assert "debug/grad_norm" in str(error.value)
    assert "step_00000005" in str(error.value)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000005"]


def test_nonfinite_update_skipped_when_configured(tmp_path, step_fn):
    sink = RecordingSink()
    state = train(
        fresh_state(),
        step_fn,
        nan_at(2),
        config=RunConfig(
            run_dir=str(tmp_path),
            num_steps=6,
            log_every=3,
            eval_every=0,
            save_every=0,
            progress=False,
        ),
        sink=sink,
        skip_nonfinite=True,
    )
    assert int(state.step) == 6
    assert all(np.isfinite(x).all() for x in leaves(state))
    assert [m["debug/skipped_updates"] for _, m in sink.logs] == [1.0, 1.0]


def test_early_stopping_on_eval_loss(tmp_path, step_fn, capsys):
    losses = iter([3.0, 2.0, 2.5, 2.0, 9.0, 1.0])
    state = run(
        tmp_path,
        step_fn,
        eval_fn=lambda state: {"eval_loss": next(losses)},
        num_steps=TOTAL_STEPS,
        eval_every=2,
        save_every=0,
        early_stopping_patience=3,
    )
    # Best 2.0 at step 4; steps 6, 8 and 10 do not improve on it.
    assert int(state.step) == 10
    assert "Early stopping at step 10" in capsys.readouterr().err
    _, metadata = restore_checkpoint(tmp_path, like=state)
    assert metadata["step"] == 10
    assert metadata["early_stopping"] == {
        "monitor": "eval_loss",
        "best": 2.0,
        "evals_without_improvement": 3,
    }
    # Restarted on the same directory, the run stays stopped.
    again = run(tmp_path, step_fn, num_steps=TOTAL_STEPS, save_every=0, early_stopping_patience=3)
    assert int(again.step) == 10
    assert "stopped early at step 10" in capsys.readouterr().err


@pytest.mark.parametrize(("min_delta", "stop"), [(0.1, 6), (0.0, TOTAL_STEPS)])
def test_early_stopping_needs_an_improvement_above_min_delta(tmp_path, step_fn, min_delta, stop):
    # 2.95 and 2.91 improve on 3.0 by less than 0.1: with min_delta=0.1 they do not count.
    losses = iter([3.0, 2.95, 2.91, 2.9, 2.89, 2.88, 2.87, 2.86, 2.85, 2.84])
    state = run(
        tmp_path,
        step_fn,
        eval_fn=lambda state: {"eval_loss": next(losses)},
        num_steps=TOTAL_STEPS,
        eval_every=2,
        save_every=0,
        early_stopping_patience=2,
        early_stopping_min_delta=min_delta,
    )
    assert int(state.step) == stop


def test_best_checkpoint_survives_rotation(tmp_path, step_fn):
    fids = iter([5.0, 3.0, 4.0, 6.0, 3.5])
    states = {}

    def eval_fn(state):
        states[int(state.step)] = leaves(state)  # the step donates its input buffers
        return {"fid": next(fids), "eval_loss": 1.0}

    run(
        tmp_path,
        step_fn,
        eval_fn=eval_fn,
        num_steps=10,
        eval_every=2,
        save_every=2,
        keep_checkpoints=1,
        hooks={"monitor": "fid"},
    )
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000010"]
    assert [p.name for p in (tmp_path / BEST_DIR).iterdir()] == ["step_00000004"]
    best, metadata = restore_checkpoint(tmp_path / BEST_DIR, like=fresh_state())
    assert metadata["early_stopping"]["monitor"] == "fid"
    assert metadata["early_stopping"]["best"] == 3.0
    assert all(np.array_equal(a, b) for a, b in zip(leaves(best), states[4], strict=True))
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000010"


def _leaves_of_file(path: pathlib.Path) -> list[np.ndarray]:
    arrays = []
    with path.open("rb") as f:
        while f.peek(1) if hasattr(f, "peek") else f.read(1):
            arrays.append(np.load(f))
    return arrays


def test_killed_run_resumes_bitwise(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    num_steps, save_every = "30", "5"

    def command(run_dir: pathlib.Path) -> list[str]:
        script = str(REPO / "tests" / "resume_script.py")
        return [sys.executable, script, str(run_dir), num_steps, save_every, "0.1"]

    straight = subprocess.run(
        command(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        command(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while len(list(killed_dir.glob("step_*/metadata.json"))) < 2:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no second checkpoint within 300 s"
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed_dir) != killed_dir / "step_00000030"

    restarted = subprocess.run(
        command(killed_dir), env=env, capture_output=True, text=True, timeout=300
    )
    assert restarted.returncode == 0, restarted.stderr
    assert "Resuming from" in restarted.stderr
    resumed_at = int(restarted.stderr.split("at step ")[1].split(".")[0])
    assert 10 <= resumed_at < 30

    final_a = tmp_path / "straight" / "step_00000030" / "state.eqx"
    final_b = killed_dir / "step_00000030" / "state.eqx"
    a, b = _leaves_of_file(final_a), _leaves_of_file(final_b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert final_a.read_bytes() == final_b.read_bytes()


def test_jsonl_sink(tmp_path):
    sink = JsonlSink(tmp_path)
    assert isinstance(sink, Sink)
    sink.log({"loss": 0.5, "bad": float("nan")}, 3)
    sink.log({"loss": 0.25}, 6)
    grid = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    sink.log_images({"samples/grid": grid, "gray": grid[..., :1]}, 6)
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "loss": 0.5, "bad": "nan"}, {"step": 6, "loss": 0.25}]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "images/samples_grid_00000006.png")), grid
    )
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "images/gray_00000006.png")), grid[..., 0]
    )
    other = JsonlSink(tmp_path / "other")
    with pytest.raises(ValueError, match="uint8"):
        other.log_images({"x": grid.astype(np.float32)}, 1)
    other.close()


def test_console_and_multi_sink(capsys):
    recording = RecordingSink()
    sink = MultiSink(ConsoleSink(), recording)
    sink.log({"loss": 0.123456, "debug/grad_norm": 1.0}, 10)
    sink.log_images({"grid": np.zeros((4, 8, 3), np.uint8)}, 10)
    sink.close()
    out = capsys.readouterr().out
    assert "step 10 | loss 0.1235" in out and "debug" not in out and "grid 8x4" in out
    assert recording.logs == [(10, {"loss": 0.123456, "debug/grad_norm": 1.0})]
    assert recording.images[0][0] == 10 and recording.closed


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_steps", 0),
        ("log_every", 0),
        ("save_every", -1),
        ("keep_checkpoints", 0),
        ("early_stopping_patience", -2),
        ("eval_every", 1.5),
        ("run_dir", ""),
        ("progress", 1),
        ("sample_every", -1),
        ("sample_every", 2.0),
        ("wandb", "cloud"),
        ("wandb_project", ""),
        ("wandb_entity", ""),
        ("wandb_init_timeout", 0),
    ],
)
def test_run_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"RunConfig\.{field}={value!r} is not allowed"):
        RunConfig(**{field: value})
