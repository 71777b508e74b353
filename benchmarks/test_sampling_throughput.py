"""Sampling throughput of `FSDM.sample`: images/s with DDIM (50 steps) and DDPM (250 respaced).

The model is the paper's (`model_preset("paper-cifar100")`: UNet, learned variance, ViT encoder
with a timestep token, so the support set's context is recomputed at every step), sampling at
the `paper-cifar100` experiment's diffusion settings with the sampler and steps replaced: DDIM
with eta = 0 over 50 steps, and ancestral DDPM over 250 steps respaced from the 1000 training
steps (improved DDPM; the paper's sampler). Each call generates a batch of images for one class
from a support set of 5 images.

FLOPs come from XLA's cost analysis of the compiled sampler. XLA counts the body of the
sampler's loop once, so the count is multiplied by the number of steps (`roofline.loop_flops`).
Two baselines are timed between the rounds: a dense float32 matmul (the practical roofline; on
a known GPU the FLOP rate is also given as MFU against the device's peak), and one evaluation of
the same network on the same batch outside any loop (context and denoiser, as one sampler step
evaluates them): ``step_over_standalone`` is the sampler's time per step over that evaluation's,
1 when the loop adds nothing. On XLA:CPU (jax 0.10) convolutions inside a loop run many times
slower than outside, which this ratio shows.

Sizes: on a GPU the paper's networks, 128 images per call. On a CPU, where that loop slowdown
makes 250 UNet steps take minutes, the reduced networks of ``conftest.py`` on 16x16 images, one
image per call, one round (the output and the JSON say so).

Run: ``python -m pytest benchmarks/test_sampling_throughput.py -o addopts= --benchmark-only -s``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import roofline

from fsdm_eqx.experiment import PRESETS

ON_GPU = roofline.ON_GPU
PAPER = PRESETS["paper-cifar100"]
NUM = 128 if ON_GPU else 1
SUPPORT = 5
ROUNDS = 5 if ON_GPU else 1
CPU_IMAGE_SIZE = 16
SAMPLERS = {
    "ddim50": dict(sampler="ddim", sampling_steps=50, ddim_eta=0.0),
    "ddpm250": dict(sampler="ddpm", sampling_steps=250),
}


@pytest.fixture(scope="module")
def setup(fsdm_model: Callable[..., Any]) -> dict[str, Any]:
    """The model, a support set, and one evaluation of the network on a batch, compiled."""
    bench = fsdm_model("unet", cpu_image_size=None if ON_GPU else CPU_IMAGE_SIZE)
    shape = (bench.config.channels, *(2 * (bench.config.image_size,)))
    support = jnp.clip(jax.random.normal(jax.random.key(3), (SUPPORT, *shape)), -1.0, 1.0)
    x_t = jax.random.normal(jax.random.key(5), (NUM, *shape))
    t = jnp.full((NUM,), 500.0)

    @eqx.filter_jit
    def evaluate(model: Any, x_t: jax.Array, t: jax.Array) -> jax.Array:
        # One sampler step's network work: the support's context at t, and the denoiser.
        def one(x: jax.Array, ti: jax.Array) -> jax.Array:
            context = model.context(support, ti if model.time_token else None, inference=True)
            return model.denoiser(x, ti, context.c, inference=True)

        return jax.vmap(one)(x_t, t)

    compiled = cast(Any, evaluate).lower(bench.model, x_t, t).compile()
    return {
        "bench": bench,
        "support": support,
        "evaluate": lambda: compiled(bench.model, x_t, t),
        "evaluate_flops": roofline.cost_flops(compiled),
    }


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampling_throughput(benchmark: Any, setup: dict[str, Any], name: str) -> None:
    bench, support = setup["bench"], setup["support"]
    config = dataclasses.replace(PAPER.diffusion, **SAMPLERS[name])

    @eqx.filter_jit
    def generate(model: Any, support: jax.Array, key: jax.Array) -> jax.Array:
        return model.sample(support, NUM, key=key, diffusion_config=config)

    key = jax.random.key(4)
    compiled = cast(Any, generate).lower(bench.model, support, key).compile()
    flops = roofline.loop_flops(compiled, config.sampling_steps)
    matmul = roofline.MatmulRoofline("float32")
    standalone: list[float] = []

    def between_rounds() -> None:
        matmul.sample()
        standalone.extend(roofline.timings(setup["evaluate"], rounds=3))

    images = benchmark.pedantic(
        lambda: jax.block_until_ready(compiled(bench.model, support, key)),
        setup=between_rounds,
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=0,
    )
    assert images.shape == (NUM, *support.shape[1:])
    assert bool(jnp.all(jnp.isfinite(images)))
    seconds = benchmark.stats.stats.median
    step_seconds = seconds / config.sampling_steps
    evaluate_seconds = statistics.median(standalone)
    figures: dict[str, Any] = {
        "value": NUM / seconds,
        "unit": "images/s",
        "seconds_per_call": seconds,
        "steps": config.sampling_steps,
        "denoiser_evaluations_per_s": NUM * config.sampling_steps / seconds,
        **roofline.roofline_figures(flops, seconds, matmul.flop_per_s, "float32"),
        "standalone_evaluation_seconds": evaluate_seconds,
        "standalone_evaluation_gflop": setup["evaluate_flops"] / 1e9,
        "step_over_standalone": step_seconds / evaluate_seconds,
    }
    run_config = {
        "preset": bench.preset,
        "reduced": bench.reduced,
        "images_per_call": NUM,
        "image_size": bench.config.image_size,
        "support": SUPPORT,
        "sampler": config.sampler,
        "sampling_steps": config.sampling_steps,
        "num_steps": config.num_steps,
        "time_token": bench.config.encoder_time_token,
    }
    roofline.publish(
        benchmark,
        f"sampling/unet/{name}",
        f"sampling {name}",
        figures,
        config=run_config,
        note=f"{bench.note}, {NUM} image{'s' if NUM > 1 else ''} per call",
    )
    assert figures["value"] > 0 and 0 < figures["ratio_to_matmul"] < 2
