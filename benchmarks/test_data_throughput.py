"""Throughput of the few-shot set sampler, in sets/s, against an H100 training step's consumption.

The data are shaped like the FC100 training split of CIFAR-100 (60 classes x 600 images,
3x32x32 uint8, random pixels: the sampler's cost does not depend on their values), drawn as the
paper configuration draws them: batches of 32 sets of ns = 6 images (the FSDM reference's
``--batch_size 32 --sample_size 5``, sets of sample_size + 1), float32 in [-1, 1].

How many sets/s one H100 consumes at the paper configuration (``paper-cifar100``: the reference
UNet, 64 channels, mult (1, 2, 3, 4), 23.9M parameters, on 32x32 images):

- forward FLOPs per image: 3.77e9, from XLA's cost analysis of the compiled UNet on one 32x32
  image (``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``, a multiply-add counted as
  2 FLOPs);
- one training step costs about 3x the forward pass (forward + backward), so one set of 6
  images costs 3 * 3.77e9 * 6 = 67.9e9 FLOPs (the set encoder adds more; leaving it out only
  raises the consumption estimated here);
- an H100 SXM peaks at 989.4e12 dense bf16 FLOP/s; a training step of small 32x32 convolutions
  reaching 35% of that peak would be an excellent utilisation, giving
  0.35 * 989.4e12 / 67.9e9 = 5.1e3 sets/s (and even 100% of the peak is only 14.6e3 sets/s).

The sampler must deliver at least 10x the 35% figure from one thread, measured in sets per second
of that thread's CPU time (``time.thread_time``): on a machine shared with other jobs, wall-clock
time also counts the time they hold the cores. Wall-clock figures (min, median, mean over 400
batches) are reported beside it. The prefetch stream's wall-clock rate with `workers` threads is
reported too; a GPU host has many more cores for them than this 2-core machine.

Run: ``python -m pytest benchmarks/test_data_throughput.py --benchmark-only -o addopts= -s``;
the figures are printed and stored in each benchmark's ``extra_info``.
"""

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import roofline

from fsdm_eqx.data import SetSampler

CLASSES, PER_CLASS = 60, 600
BATCH_SETS, NS = 32, 6
UNET_FORWARD_FLOPS = 3.77e9
TRAIN_OVER_FORWARD = 3.0
H100_BF16_PEAK = 989.4e12
ASSUMED_UTILISATION = 0.35
H100_SETS_PER_S = (
    ASSUMED_UTILISATION * H100_BF16_PEAK / (TRAIN_OVER_FORWARD * UNET_FORWARD_FLOPS * NS)
)
REQUIRED_RATIO = 10.0


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    images = rng.integers(0, 256, (labels.size, 3, 32, 32), dtype=np.uint8)
    return images, labels


def _cpu_sets_per_s(draw: Callable[[], object], batches: int = 400) -> float:
    """Sets per second of this thread's CPU time: on a shared machine, wall-clock time also
    counts the time other processes hold the cores."""
    start = time.thread_time()
    for _ in range(batches):
        draw()
    return batches * BATCH_SETS / (time.thread_time() - start)


def _report(benchmark: Any, name: str, key: str, cpu_sets_per_s: float | None = None) -> float:
    stats = benchmark.stats.stats
    wall = {k: BATCH_SETS / getattr(stats, k) for k in ("min", "median", "mean")}
    info = {f"wall_sets_per_s_{k}": v for k, v in wall.items()}
    info |= {"h100_sets_per_s_estimate": H100_SETS_PER_S, "cpus": os.cpu_count()}
    line = ", ".join(f"{k} {v:,.0f}" for k, v in wall.items())
    sets_per_s = wall["mean"]  # a rate over many batches is batches / total time
    if cpu_sets_per_s is not None:
        info["cpu_sets_per_s"] = sets_per_s = cpu_sets_per_s
        line = f"{cpu_sets_per_s:,.0f} sets per CPU-second; wall clock {line}"
    ratio = sets_per_s / H100_SETS_PER_S
    info["ratio"] = ratio
    benchmark.extra_info.update(info)
    unit = "sets/s" if cpu_sets_per_s is None else "sets per CPU-second"
    figures = {"value": sets_per_s, "unit": unit, "ratio": ratio} | info
    figures["ratio_to"] = f"one H100's consumption, ~{H100_SETS_PER_S:,.0f} sets/s (estimate)"
    roofline.record(f"data/{key}", figures, note=f"{name}, {BATCH_SETS} sets of {NS}, 3x32x32")
    print(
        f"\n{name}: {line} sets/s; one H100 consumes ~{H100_SETS_PER_S:,.0f} sets/s at the paper "
        f"configuration; ratio {ratio:.1f}x"
    )
    return ratio


@pytest.mark.parametrize("flips", [False, True], ids=["plain", "flips"])
def test_sampler_batch(benchmark: Any, dataset: tuple[np.ndarray, np.ndarray], flips: bool) -> None:
    images, labels = dataset
    sampler = SetSampler(
        images, labels, range(CLASSES), ns=NS, batch_size=BATCH_SETS, flips=flips, prefetch=0
    )
    steps = itertools.count()
    sets, _ = benchmark.pedantic(
        lambda: sampler.batch(next(steps)), rounds=400, warmup_rounds=20, iterations=1
    )
    assert sets.shape == (BATCH_SETS, NS, 3, 32, 32) and sets.dtype == np.float32
    cpu = _cpu_sets_per_s(lambda: sampler.batch(next(steps)))
    kind = "flips" if flips else "plain"
    assert _report(benchmark, f"batch ({kind})", f"sampler_batch_{kind}", cpu) >= REQUIRED_RATIO


def test_prefetch_stream(benchmark: Any, dataset: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = dataset
    workers = min(8, os.cpu_count() or 1)
    sampler = SetSampler(
        images, labels, range(CLASSES), ns=NS, batch_size=BATCH_SETS, prefetch=2 * workers,
        workers=workers,
    )  # fmt: skip
    with sampler.stream() as stream:
        sets, _ = benchmark.pedantic(
            lambda: next(stream), rounds=400, warmup_rounds=20, iterations=1
        )
    assert sets.shape == (BATCH_SETS, NS, 3, 32, 32)
    # Reported, not asserted: with 2 cores shared by several jobs, threads mostly contend.
    assert _report(benchmark, f"stream ({workers} workers)", "sampler_stream") > 0
