"""Training throughput of the denoisers: forward + backward images/s, and FLOP/s against a matmul.

One jitted step computes the epsilon-MSE of a batch and its gradient with respect to every
parameter (no optimiser update). Its FLOPs per step come from XLA's cost analysis of the compiled
step; dividing by the median step time gives the achieved FLOP/s, reported as a ratio to a dense
float32 matmul timed between the steps (the same dtype and default precision as the model), and
on a known GPU as MFU against the device's peak. `test_train_throughput.py` times the whole
FSDM training step; this one isolates the denoisers.

On a GPU the networks are the paper's: the UNet of the FSDM reference configuration
(``vfsddpm_cifar100_vit_film_mean_sigma``, 32x32, 23.9M parameters) and DiT-S/2 (the default
``ModelConfig`` DiT), on batches of 192 images (32 sets of 6, the reference batch). On a CPU they
are shrunk (16x16 images, narrow, shallow, batch 4) so that the suite still runs in minutes.

Run: ``python -m pytest benchmarks/test_denoiser_throughput.py -s``; the figures are printed and
stored in each benchmark's ``extra_info`` (``--benchmark-json=FILE`` saves them).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import roofline

from fsdm_eqx.nn.unet import UNet

ON_GPU = jax.default_backend() == "gpu"
CONTEXT_DIM = 256 if ON_GPU else 32
IMAGE = 32 if ON_GPU else 16
BATCH = 192 if ON_GPU else 4
ROUNDS = 20 if ON_GPU else 5


def make_unet(key: jax.Array) -> eqx.Module:
    if ON_GPU:
        sizes: dict[str, Any] = dict(
            model_channels=64,
            num_res_blocks=2,
            attention_resolutions=(16, 8),
            channel_mult=(1, 2, 3, 4),
            num_heads=4,
        )
    else:
        sizes = dict(
            model_channels=32,
            num_res_blocks=1,
            attention_resolutions=(8,),
            channel_mult=(1, 2),
            num_heads=2,
        )
    return UNet(
        in_channels=3,
        out_channels=6,
        dropout=0.2,
        context_dim=CONTEXT_DIM,
        conditioning="film",
        image_size=IMAGE,
        key=key,
        **sizes,
    )


def make_dit(key: jax.Array) -> eqx.Module:
    try:
        from fsdm_eqx.nn.dit import DIT_SIZES, DiT
    except ImportError as error:
        pytest.skip(f"the DiT is not importable yet ({error})")
    hidden, depth, heads = DIT_SIZES["S"] if ON_GPU else (64, 2, 2)
    return DiT(
        image_size=IMAGE,
        in_channels=3,
        out_channels=6,
        patch_size=2 if ON_GPU else 4,
        hidden=hidden,
        depth=depth,
        num_heads=heads,
        context_dim=CONTEXT_DIM,
        conditioning="film",
        key=key,
    )


MODELS: dict[str, Callable[[jax.Array], eqx.Module]] = {"unet": make_unet, "dit": make_dit}


def make_train_step(model: eqx.Module) -> tuple[Any, Callable[..., Any]]:
    """The model's parameters, and a step mapping them and a batch to (loss, gradient).

    The loss is the epsilon-MSE of a noised batch; no optimiser update is included.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(
        params: Any,
        x0: jax.Array,
        t: jax.Array,
        context: jax.Array,
        noise: jax.Array,
        key: jax.Array,
    ) -> tuple[jax.Array, Any]:
        keys = jax.random.split(key, x0.shape[0])

        def loss_fn(params: Any) -> jax.Array:
            net = eqx.combine(params, static)
            x_t = x0 + noise
            out = jax.vmap(lambda x, t, c, k: net(x, t, c, key=k))(x_t, t, context, keys)
            return jnp.mean((out[:, : x0.shape[1]] - noise) ** 2)

        return jax.value_and_grad(loss_fn)(params)

    return params, step


@pytest.mark.parametrize("name", list(MODELS))
def test_denoiser_train_step_throughput(benchmark: Any, name: str) -> None:
    model = MODELS[name](jax.random.key(0))
    params, step = make_train_step(model)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    ks = jax.random.split(jax.random.key(1), 4)
    x0 = jax.random.normal(ks[0], (BATCH, 3, IMAGE, IMAGE))
    noise = jax.random.normal(ks[1], (BATCH, 3, IMAGE, IMAGE))
    t = jax.random.uniform(ks[2], (BATCH,), maxval=1000.0)
    context = jax.random.normal(ks[3], (BATCH, CONTEXT_DIM))
    args = (params, x0, t, context, noise, jax.random.key(2))
    compiled = jax.jit(step).lower(*args).compile()
    flops = roofline.cost_flops(compiled)

    def run():
        return jax.block_until_ready(compiled(*args))

    loss, _ = run()  # warm-up outside the timed rounds
    assert jnp.isfinite(loss)
    matmul = roofline.MatmulRoofline("float32")
    benchmark.pedantic(run, setup=matmul.sample, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    figures: dict[str, Any] = {
        "value": BATCH / seconds,
        "unit": "images/s",
        **roofline.roofline_figures(flops, seconds, matmul.flop_per_s, "float32"),
    }
    config = {"batch": BATCH, "image": IMAGE, "parameters": n_params, "reduced": not ON_GPU}
    size = "paper network" if ON_GPU else f"CPU: reduced network on {IMAGE}x{IMAGE}"
    roofline.publish(
        benchmark,
        f"denoiser_fwd_bwd/{name}",
        name,
        figures,
        config=config,
        note=f"{size}, batch {BATCH}",
    )
    assert figures["value"] > 0 and 0 < figures["ratio_to_matmul"] < 2
