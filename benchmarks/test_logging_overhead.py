"""What the instrumentation costs: training throughput with logging at the default frequencies
against the same training with none, in the same run.

Logged: `make_sink` (console + JSONL + W&B, offline here, so no network is timed), the loop's
metrics every `RunConfig().log_every` steps (pulled from the device, with the system and progress
metrics) and `images_fn` every `RunConfig().sample_every` steps: generations of the EMA model on
fixed support sets (the preset's sampler) drawn by `generation_figure`, as the experiment logs them,
and the progress bar. Baseline: a `NullSink`, no hooks, no progress bar (the loop still pulls its
metrics every `log_every` steps: that is part of training). Evaluation is off in both.

Each run is `RunConfig().sample_every` training steps (one full image period, so that the image cost
counts once per period as it does in a long run) of the library's step on an FSDM. Runs alternate
baseline / logged, `REPEATS` times each, on the same compiled step and batches, and the cheapest
run of each kind is compared. W&B's start and finish happen once per run, outside the timed loop,
and are reported apart.

What is timed: on a GPU (a machine of its own) the wall-clock time. On a CPU the CPU time of this
process and of its live child processes (W&B's `wandb-core` service, which does the writing) over
the loop: on a shared CPU machine the wall-clock time mostly measures the other jobs (steps/s
varied 2-3x within one run on the 2-core development machine), while the CPU time is the work
the logging adds. Wall-clock figures are reported beside it. Under a heavy, varying load even
the CPU time of the same run varies by ~10%, more than the overhead sought, so the logged runs
also time the logging directly: the wall-clock time spent inside the sink's methods and
`images_fn`, plus the CPU time of W&B's service, as a share of the baseline's training time. Both
the with/without ratio and this direct share must stay within 5%.

Sizes: on a GPU, DiT-S/2 (`dit-s-cifar100`) on the paper batch (32 sets of 6, 32x32). On a CPU the
`smoke` networks on one set of 6 images of 3x16x16: a step of tens of milliseconds, so that 1000
steps take seconds to tens of seconds and the per-period logging cost is compared with real work,
not with an empty step.

Run: ``python -m pytest benchmarks/test_logging_overhead.py -o addopts= --benchmark-only -s``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from fsdm_eqx.config import RunConfig, model_preset
from fsdm_eqx.experiment import PRESETS
from fsdm_eqx.instrument import NullSink, Sink, generation_figure, make_sink
from fsdm_eqx.nn import FSDM
from fsdm_eqx.train import fsdm_loss_fn, init_train_state, make_train_step, train

ON_GPU = jax.default_backend() == "gpu"
DEFAULTS = RunConfig()
STEPS = DEFAULTS.sample_every
REPEATS = 3 if ON_GPU else 2
MAX_OVERHEAD = 0.05
SMOKE = PRESETS["smoke"]
if ON_GPU:
    MODEL = model_preset("dit-s-cifar100")
    BATCH_SETS = PRESETS["paper-cifar100"].data.batch_size
else:
    MODEL = dataclasses.replace(SMOKE.model, image_size=16, encoder_patch_size=4)
    BATCH_SETS = 1
DIFFUSION = SMOKE.diffusion
OPTIM = SMOKE.optim
IMAGE_SETS = 2


class TimedSink:
    """Forwards to ``sink`` and adds the wall-clock time of each call to ``seconds``."""

    def __init__(self, sink: Sink) -> None:
        self.sink, self.seconds = sink, 0.0

    def _timed(self, method: Callable[..., None], *args: Any) -> None:
        start = time.perf_counter()
        method(*args)
        self.seconds += time.perf_counter() - start

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._timed(self.sink.log, metrics, step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self._timed(self.sink.log_images, images, step)

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        self._timed(self.sink.log_histograms, values, step)

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        self._timed(self.sink.log_table, name, columns, rows, step)

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        self._timed(self.sink.log_confusion_matrix, name, classes, counts, step)

    def close(self) -> None:
        self.sink.close()


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live children (Linux `/proc`)."""
    total = 0.0
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _images_fn(supports: jax.Array) -> Callable[[Any], dict[str, np.ndarray]]:
    """Generations of the EMA model on fixed support sets, each drawn with its support."""
    keys = jax.random.split(jax.random.key(3), len(supports))

    @eqx.filter_jit
    def generate(model: FSDM, supports: jax.Array, keys: jax.Array) -> jax.Array:
        def one(support: jax.Array, key: jax.Array) -> jax.Array:
            return model.sample(support, len(support), key=key, diffusion_config=DIFFUSION)

        return jax.vmap(one)(supports, keys)

    def images_fn(state: Any) -> dict[str, np.ndarray]:
        generated = np.asarray(generate(eqx.nn.inference_mode(state.ema), supports, keys))
        host = np.asarray(supports)
        return {
            f"generation/set_{i}": generation_figure(s, g)
            for i, (s, g) in enumerate(zip(host, generated, strict=True))
        }

    return images_fn


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its live children."""
    return time.process_time() + _children_cpu_seconds()


def test_logging_overhead(benchmark: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    step_fn = make_train_step(fsdm_loss_fn(DIFFUSION), OPTIM, total_steps=STEPS)
    shape = (BATCH_SETS, MODEL.ns, MODEL.channels, MODEL.image_size, MODEL.image_size)
    rng = np.random.default_rng(0)
    pool = [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(8)]
    supports = jnp.asarray(rng.uniform(-1, 1, (IMAGE_SETS, *shape[2:])).astype(np.float32))
    supports = jnp.broadcast_to(supports[:, None], (IMAGE_SETS, MODEL.ns - 1, *shape[2:]))
    images_fn = _images_fn(supports)

    def fresh_state() -> Any:
        # A new model each time: the step donates the state's buffers.
        model = FSDM(MODEL, key=jax.random.key(0))
        return init_train_state(model, OPTIM, key=jax.random.key(1), total_steps=STEPS)

    # Compile the step and the sampler outside the timings.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        warm, _ = step_fn(fresh_state(), jnp.asarray(pool[0]))
        images_fn(warm)

    def run(index: int, logged: bool) -> dict[str, float]:
        config = dataclasses.replace(
            DEFAULTS,
            run_dir=str(tmp_path / f"{'logged' if logged else 'plain'}_{index}"),
            num_steps=STEPS,
            eval_every=0,
            save_every=0,
            progress=logged,
            wandb="offline",
        )
        state = fresh_state()
        start = time.perf_counter()
        sink = TimedSink(
            make_sink(config, name=f"overhead_{index}", config={}) if logged else NullSink()
        )
        image_seconds = [0.0]

        def timed_images_fn(state: Any) -> dict[str, np.ndarray]:
            begin = time.perf_counter()
            images = images_fn(state)
            image_seconds[0] += time.perf_counter() - begin
            return images

        started, cpu_started = time.perf_counter(), _cpu_seconds()
        children_started = _children_cpu_seconds()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            train(
                state,
                step_fn,
                lambda step: pool[step % len(pool)],
                config=config,
                sink=sink,
                images_fn=timed_images_fn if logged else None,
            )
        trained, cpu_trained = time.perf_counter(), _cpu_seconds()
        children = _children_cpu_seconds() - children_started
        sink.close()
        closed = time.perf_counter()
        return {
            "wall": trained - started,
            "cpu": cpu_trained - cpu_started,
            "setup_and_close": (started - start) + (closed - trained),
            "logging": sink.seconds + image_seconds[0] + children,
        }

    timings: dict[str, list[dict[str, float]]] = {"plain": [], "logged": []}

    def measure() -> None:
        for index in range(REPEATS):
            timings["plain"].append(run(index, logged=False))
            timings["logged"].append(run(index, logged=True))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    timed = "wall" if ON_GPU else "cpu"
    plain = min(t[timed] for t in timings["plain"])
    logged = min(t[timed] for t in timings["logged"])
    overhead = logged / plain - 1.0
    direct = max(t["logging"] for t in timings["logged"]) / min(t["wall"] for t in timings["plain"])
    images_per_step = BATCH_SETS * MODEL.ns
    logged_dir = tmp_path / "logged_0"
    lines = (logged_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS // DEFAULTS.log_every
    assert len(list((logged_dir / "images").glob("generation_set_*.png"))) == IMAGE_SETS
    assert list(logged_dir.glob("wandb/offline-run-*/run-*.wandb"))
    figures: dict[str, Any] = {
        "value": STEPS * images_per_step / logged,
        "unit": f"images per {timed} second, logged",
        "baseline_images_per_s": STEPS * images_per_step / plain,
        "ratio": plain / logged,
        "ratio_to": "training without logging (throughput logged / not logged)",
        "timed": timed,
        "overhead": overhead,
        "direct_share": direct,
        "logging_seconds": [t["logging"] for t in timings["logged"]],
        **{
            f"{clock}_seconds_{kind}": [t[clock] for t in timings[kind]]
            for clock in ("wall", "cpu")
            for kind in ("plain", "logged")
        },
        "wandb_start_and_finish_seconds": [t["setup_and_close"] for t in timings["logged"]],
        "config": {
            "steps_per_run": STEPS,
            "log_every": DEFAULTS.log_every,
            "sample_every": DEFAULTS.sample_every,
            "batch_sets": BATCH_SETS,
            "ns": MODEL.ns,
            "image_size": MODEL.image_size,
            "image_sets": IMAGE_SETS,
            "sampling_steps": DIFFUSION.sampling_steps,
            "backend": jax.default_backend(),
        },
    }
    benchmark.extra_info.update(figures)
    rounded = {
        clock: {k: [round(t[clock], 2) for t in v] for k, v in timings.items()}
        for clock in ("wall", "cpu")
    }
    print(
        f"\nlogging overhead ({timed} time): {100 * overhead:+.2f}% ({STEPS} steps: "
        f"{plain:.2f} s without, {logged:.2f} s with logging at log_every={DEFAULTS.log_every}, "
        f"sample_every={DEFAULTS.sample_every}; throughput ratio {plain / logged:.4f}; "
        f"W&B start+finish {min(figures['wandb_start_and_finish_seconds']):.2f} s per run; "
        f"seconds per run {rounded}; time in the sink, images_fn and W&B's service: "
        f"{[round(t['logging'], 3) for t in timings['logged']]} s, "
        f"{100 * direct:.2f}% of the baseline's training time)"
    )
    assert overhead <= MAX_OVERHEAD, f"logging costs {100 * overhead:.1f}% of training throughput"
    assert direct <= MAX_OVERHEAD, f"logging calls take {100 * direct:.1f}% of the training time"
