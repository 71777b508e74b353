"""Training-step throughput of the whole FSDM (encoder, posterior, denoiser, AdamW, EMA).

The step is the library's own (`make_train_step` over `fsdm_loss_fn`), at the `paper-cifar100`
experiment's diffusion and optimiser settings, with both denoisers: the paper's UNet
(`model_preset("paper-cifar100")`) and DiT-S/2 (`model_preset("dit-s-cifar100")`). Each step
denoises every image of every set from its leave-one-out context, so images/s counts
sets x ns images per step.

FLOPs per step come from XLA's cost analysis of the compiled step (forward, backward, optimiser);
over the median step time they give the achieved FLOP/s, reported as a ratio to a dense matmul of
the compute dtype timed between the steps (the practical roofline, median over the same rounds),
and on a known GPU as model FLOP utilisation (MFU) against the device's peak for that dtype.

Sizes: on a GPU, the paper's networks and batch (32 sets of 6, 32x32), in float32 and bfloat16.
On a CPU the paper networks are too heavy for a shared 2-core machine: the shapes stay the
paper's (sets of 6 images of 3x32x32, the same layer kinds, patch sizes and conditioning) but
the batch is 2 sets and the networks are narrow and shallow; the output and the JSON say so.

Run: ``python -m pytest benchmarks/test_train_throughput.py -o addopts= --benchmark-only -s``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import pytest
import roofline

from fsdm_eqx.experiment import PRESETS
from fsdm_eqx.nn import count_parameters
from fsdm_eqx.train import fsdm_loss_fn, init_train_state, make_train_step

ON_GPU = roofline.ON_GPU
PAPER = PRESETS["paper-cifar100"]
BATCH_SETS = PAPER.data.batch_size if ON_GPU else 2
ROUNDS = 20 if ON_GPU else 5
PRECISIONS = ("float32", "bfloat16") if ON_GPU else ("float32",)
SHOWN = ("hdim", "encoder_depth", "dit_hidden", "dit_depth", "dit_patch_size",
         "unet_model_channels", "unet_channel_mult", "unet_num_res_blocks")  # fmt: skip


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_train_step_throughput(
    benchmark: Any, fsdm_model: Callable[[str], Any], denoiser: str, precision: str
) -> None:
    bench = fsdm_model(denoiser)
    model_config, model = bench.config, bench.model
    optim_config = dataclasses.replace(PAPER.optim, precision=precision)
    parameters = sum(count_parameters(model).values())
    step = make_train_step(fsdm_loss_fn(PAPER.diffusion), optim_config, total_steps=10_000)
    state = init_train_state(model, optim_config, key=jax.random.key(1), total_steps=10_000)
    shape = (BATCH_SETS, model_config.ns, model_config.channels, *(2 * (model_config.image_size,)))
    batch = jnp.clip(jax.random.normal(jax.random.key(2), shape), -1.0, 1.0)
    with warnings.catch_warnings():  # the batch is donated too, and no output can reuse it
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        compiled = cast(Any, step).lower(state, batch).compile()
    flops = roofline.cost_flops(compiled)

    holder = [state]

    def run() -> dict[str, jax.Array]:
        holder[0], metrics = compiled(holder[0], batch)
        return jax.block_until_ready(metrics)

    metrics = run()
    assert bool(jnp.isfinite(metrics["loss"])) and float(metrics["debug/nonfinite"]) == 0.0
    matmul = roofline.MatmulRoofline(precision)
    benchmark.pedantic(run, setup=matmul.sample, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    images = BATCH_SETS * model_config.ns
    figures: dict[str, Any] = {
        "value": images / seconds,
        "unit": "images/s",
        "steps_per_s": 1.0 / seconds,
        "step_seconds_median": seconds,
        "step_seconds_min": benchmark.stats.stats.min,
        **roofline.roofline_figures(flops, seconds, matmul.flop_per_s, precision),
    }
    config = {
        "preset": bench.preset,
        "reduced": bench.reduced,
        "batch_sets": BATCH_SETS,
        "ns": model_config.ns,
        "images_per_step": images,
        "image_size": model_config.image_size,
        "precision": precision,
        "parameters": parameters,
        "model": {k: getattr(model_config, k) for k in SHOWN},
    }
    roofline.publish(
        benchmark,
        f"train_step/{denoiser}/{precision}",
        f"train step {denoiser} {precision}",
        figures,
        config=config,
        note=f"{bench.note}, {BATCH_SETS} sets of {model_config.ns} per step",
    )
    assert figures["value"] > 0 and 0 < figures["ratio_to_matmul"] < 2
