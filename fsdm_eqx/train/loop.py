"""The training loop: resume, step, log, sample, evaluate, checkpoint, guard, stop early.

The loop never waits on the device per step: the non-finite flag of step ``i`` is read after step
``i + 1`` has been dispatched, and the other metrics only every ``log_every`` steps, together with
the throughput, progress and device memory. Images come every ``sample_every`` steps, the heavy
visuals (images, histograms, scalars) at evaluation time.
"""

import dataclasses
import math
import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree
from tqdm.auto import tqdm

from ..config import RunConfig
from ..instrument.encoder import Visuals
from ..instrument.sinks import Sink
from .checkpoint import (
    BEST_DIR,
    latest_checkpoint,
    restore_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from .optimizer import ScheduleState, find_schedule_state
from .state import TrainState

StepFn = Callable[[TrainState, PyTree], tuple[TrainState, dict[str, Array]]]


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or gradient and the run stops."""


def _default_place(batch: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.asarray, batch)


def _images_per_step(batch: PyTree) -> int:
    shape = np.shape(jax.tree_util.tree_leaves(batch)[0])
    return int(np.prod(shape[:2])) if len(shape) >= 2 else int(np.prod(shape))


def _memory_metrics() -> dict[str, float]:
    """Bytes in use and at peak on the first local device, where the backend reports them."""
    stats = jax.local_devices()[0].memory_stats() or {}
    names = {
        "bytes_in_use": "system/memory_in_use_bytes",
        "peak_bytes_in_use": "system/memory_peak_bytes",
    }
    return {name: float(stats[key]) for key, name in names.items() if key in stats}


def _offending(metrics: dict[str, float]) -> list[str]:
    names = [k for k in metrics if k == "loss" or k.startswith("debug/grad_norm")]
    return [f"{k}={metrics[k]}" for k in names if not math.isfinite(metrics[k])]


def _warn_if_horizon_kept(
    checkpoint: pathlib.Path, asked: ScheduleState | None, kept: ScheduleState | None
) -> None:
    """Warn when the restored learning-rate schedule's horizon is not the one the fresh state
    asked for (a resume with another run length): the restored one is kept, so that the
    learning rate goes on from its value rather than jumping."""
    if asked is None or kept is None or int(asked.horizon) == int(kept.horizon):
        return
    warnings.warn(
        f"The learning-rate schedule of {checkpoint} has a horizon of {int(kept.horizon)} steps "
        f"(0: no decay) and this run's fresh state one of {int(asked.horizon)}; the checkpoint's "
        "is kept, so that the learning rate goes on without a jump. Train in a new run "
        "directory for a new schedule.",
        stacklevel=3,
    )


@dataclasses.dataclass
class _Pending:
    """Metrics of the last dispatched step, not yet checked on the host."""

    step: int
    metrics: dict[str, Array]
    checked: bool = False


def train(
    state: TrainState,
    step_fn: StepFn,
    batch_fn: Callable[[int], PyTree],
    *,
    config: RunConfig,
    sink: Sink,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    metadata: dict[str, Any] | None = None,
    place_batch: Callable[[PyTree], PyTree] | None = None,
    skip_nonfinite: bool = False,
    images_fn: Callable[[TrainState], dict[str, np.ndarray]] | None = None,
    visuals_fn: Callable[[TrainState], Visuals] | None = None,
    monitor: str = "eval_loss",
) -> TrainState:
    """Train ``state`` to ``config.num_steps`` steps, resuming from ``config.run_dir``.

    **Arguments:**
    - `state`: the initial training state (also the template a checkpoint is restored into).
    - `step_fn`: `make_train_step(...)`, `(state, batch) -> (state, metrics)`.
    - `batch_fn`: `batch_fn(step) -> batch`, deterministic in `step`, so that a resumed run sees
      the batches the interrupted one would have seen.
    - `config`: the run's length, directory and intervals.
    - `sink`: where metrics go (`make_sink`, `JsonlSink`, `ConsoleSink`, `MultiSink`,
      `WandbSink`). Besides the step's metrics the loop logs `system/steps_per_second`,
      `system/images_per_second`, `system/memory_in_use_bytes` and `system/memory_peak_bytes`
      (where the device reports them), `progress/percent_complete` and `progress/eta_seconds`.
    - `eval_fn`: `eval_fn(state) -> {"eval_loss": ..., ...}`, run every `config.eval_every`
      steps; its `monitor` value drives early stopping and the best checkpoint.
    - `metadata`: JSON-able facts stored in every checkpoint (model/data configs, class splits).
    - `place_batch`: puts a host batch on the devices (e.g. `shard_batch`); `jnp.asarray` if None.
    - `skip_nonfinite`: pass `OptimConfig.skip_nonfinite`: when True a non-finite step (whose
      update the step function skipped) is counted in `debug/skipped_updates` and the run goes
      on; when False the run stops with `NonFiniteError`.
    - `images_fn`: `images_fn(state) -> {name: uint8 HWC image}`, run every
      `config.sample_every` steps (e.g. generations on sets fixed at the start).
    - `visuals_fn`: `visuals_fn(state) -> Visuals`, run every `config.eval_every` steps; its
      images, histograms and scalars go to the sink's matching methods.
    - `monitor`: the result of `eval_fn` that is better when lower (`eval_loss`, `fid`). An
      evaluation that returns it and improves on the best by more than
      `config.early_stopping_min_delta` resets early stopping's patience and, with
      `config.keep_best`, is saved under `run_dir/best/` (one checkpoint, never rotated away).
      Evaluations that do not return it leave both alone.

    **Returns:** the final state.

    **Raises:** `NonFiniteError` naming the step (the index given to `batch_fn`, i.e. the
    state's step count before it) and the non-finite metrics; no checkpoint is
    written after that step, so the last one on disk is the last good one.
    """
    place = place_batch if place_batch is not None else _default_place
    run_dir = config.run_dir
    run_metadata = {
        **(metadata or {}),
        "run_config": dataclasses.asdict(config),
    }
    best_value = math.inf
    evals_without_improvement = 0
    skipped = 0

    checkpoint = resumable_checkpoint(run_dir)
    if checkpoint is not None:
        asked = find_schedule_state(state.opt_state)
        state, restored = restore_checkpoint(checkpoint, state)
        _warn_if_horizon_kept(checkpoint, asked, find_schedule_state(state.opt_state))
        stopping = restored.get("early_stopping", {})
        best = stopping.get("best", stopping.get("best_eval_loss"))
        if stopping.get("monitor", "eval_loss") != monitor:
            best = None  # another metric: its best says nothing about this one
        best_value = math.inf if best is None else float(best)
        evals_without_improvement = int(stopping.get("evals_without_improvement", 0))
        skipped = int(restored.get("skipped_updates", 0))
        print(f"Resuming from {checkpoint} at step {int(state.step)}.", file=sys.stderr)
    step = int(state.step)
    patience = config.early_stopping_patience
    if patience and evals_without_improvement >= patience:
        print(f"The run in {run_dir} stopped early at step {step}.", file=sys.stderr)
        return state
    last_saved = step

    def save(at_step: int, directory: pathlib.Path | str = run_dir, keep: int = 0) -> None:
        nonlocal last_saved
        if directory == run_dir:
            last_saved = at_step
        if jax.process_index() != 0:
            return
        save_checkpoint(
            directory,
            state,
            keep=keep or config.keep_checkpoints,
            metadata={
                **run_metadata,
                "sampler_position": at_step,
                "skipped_updates": skipped,
                "early_stopping": {
                    "monitor": monitor,
                    "best": best_value if math.isfinite(best_value) else None,
                    "evals_without_improvement": evals_without_improvement,
                },
            },
        )

    def check(pending: _Pending | None) -> None:
        nonlocal skipped
        if pending is None or pending.checked:
            return
        pending.checked = True
        if float(pending.metrics["debug/nonfinite"]) == 0.0:
            return
        if skip_nonfinite:
            skipped += 1
            return
        host = {k: float(v) for k, v in pending.metrics.items()}
        offending = ", ".join(_offending(host)) or "a non-finite gradient"
        last = latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise NonFiniteError(
            f"Training step {pending.step} produced non-finite values ({offending}); the run "
            f"stops and {kept}. Set OptimConfig.skip_nonfinite=True to skip such updates instead."
        )

    bar = (
        tqdm(total=config.num_steps, initial=step, unit="step", dynamic_ncols=True)
        if config.progress
        else None
    )
    pending: _Pending | None = None
    last_log_time = time.perf_counter()
    last_log_step = step
    steps_per_second = math.nan
    stopped_early = False
    try:
        while step < config.num_steps:
            host_batch = batch_fn(step)
            state, metrics = step_fn(state, place(host_batch))
            check(pending)
            pending = _Pending(step, metrics)
            step += 1
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                check(pending)
                # One transfer for all the metrics, rather than a sync per value.
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                images = _images_per_step(host_batch)
                now = time.perf_counter()
                steps_per_second = (step - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                host.update(
                    {
                        "system/steps_per_second": steps_per_second,
                        "system/images_per_second": steps_per_second * images,
                        "progress/percent_complete": 100.0 * step / config.num_steps,
                        "progress/eta_seconds": (config.num_steps - step) / steps_per_second,
                        **_memory_metrics(),
                    }
                )
                if skip_nonfinite:
                    host["debug/skipped_updates"] = float(skipped)
                sink.log(host, step)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{host['loss']:.4g}", img_s=f"{host['system/images_per_second']:.3g}"
                    )
            if images_fn is not None and config.sample_every and step % config.sample_every == 0:
                check(pending)
                sink.log_images(images_fn(state), step)
            evaluating = config.eval_every and step % config.eval_every == 0
            if visuals_fn is not None and evaluating:
                check(pending)
                visuals = visuals_fn(state)
                if visuals.images:
                    sink.log_images(visuals.images, step)
                if visuals.histograms:
                    sink.log_histograms(visuals.histograms, step)
                if visuals.scalars:
                    sink.log({k: float(v) for k, v in visuals.scalars.items()}, step)
            if eval_fn is not None and evaluating:
                check(pending)
                results = {k: float(v) for k, v in eval_fn(state).items()}
                sink.log(results, step)
                if monitor in results:
                    if results[monitor] < best_value - config.early_stopping_min_delta:
                        best_value = results[monitor]
                        evals_without_improvement = 0
                        if config.keep_best:
                            save(step, pathlib.Path(run_dir) / BEST_DIR, keep=1)
                    else:
                        evals_without_improvement += 1
                    if patience and evals_without_improvement >= patience:
                        stopped_early = True
            if (config.save_every and step % config.save_every == 0) or stopped_early:
                check(pending)
                save(step)
            if stopped_early:
                print(
                    f"Early stopping at step {step}: {monitor} has not improved on "
                    f"{best_value:.6g} for {evals_without_improvement} evaluations.",
                    file=sys.stderr,
                )
                break
        check(pending)
        if last_saved != step:
            save(step)
    finally:
        if bar is not None:
            bar.close()
    return state
