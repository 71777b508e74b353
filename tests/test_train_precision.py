"""Mixed precision and rematerialisation of the FSDM, with the DiT and with the UNet.

bfloat16: every matrix product and convolution of the training step (encoder, denoiser, forward
and backward) takes bfloat16 operands, while parameters, optimiser state and the loss stay
float32; the bfloat16 loss is close to the float32 one and a few bfloat16 steps train.
Rematerialisation: the same gradients, with a checkpoint around every block in the jaxpr.
"""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.config import DiffusionConfig, ModelConfig, OptimConfig, model_preset
from fsdm_eqx.nn import FSDM, DiT
from fsdm_eqx.train import cast_floating, fsdm_loss_fn, init_train_state, make_train_step
from tests.helpers import perturb_zeros, small_unet

TINY = dataclasses.replace(
    model_preset("smoke"), image_size=16, encoder_patch_size=8, dit_patch_size=4, ns=3
)
CONFIGS = {
    "dit": TINY,
    "unet": small_unet(TINY, unet_attention_resolutions=(8,)),
}
CONFIGS["unet_time_token"] = dataclasses.replace(CONFIGS["unet"], encoder_time_token=True)
DIFFUSION = DiffusionConfig(num_steps=100, sampling_steps=4)
LOSS_FN = fsdm_loss_fn(DIFFUSION)
BATCH = 2
BF16_REL_TOL = 2e-3
"""bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); on these networks
the loss moved by 6e-5 (DiT) and 1.1e-4 (UNet) relative, well within this bound."""


@functools.cache
def _model(name: str, remat: bool = False) -> FSDM:
    config = dataclasses.replace(CONFIGS[name], remat=remat)
    return perturb_zeros(FSDM(config, key=jax.random.key(0)))


@functools.cache
def _abstract_model(name: str, remat: bool = False) -> FSDM:
    """The model's shapes and dtypes only: enough to trace, and builds in no time."""
    config = dataclasses.replace(CONFIGS[name], remat=remat)
    return eqx.filter_eval_shape(FSDM, config, key=jax.random.key(0))


def _batch(name: str) -> jax.Array:
    config = CONFIGS[name]
    shape = (BATCH, config.ns, config.channels, config.image_size, config.image_size)
    return jax.random.uniform(jax.random.key(2), shape, minval=-1.0, maxval=1.0)


KEYS = jax.random.split(jax.random.key(3), BATCH)


@eqx.filter_jit
def batch_loss(model, batch, keys):
    losses, _ = jax.vmap(LOSS_FN, in_axes=(None, 0, 0))(model, batch, keys)
    return jnp.mean(losses.astype(jnp.float32))


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _walk(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _walk(sub)


def _operand_dtypes(jaxpr, primitive: str) -> list[tuple[str, ...]]:
    return [
        tuple(str(v.aval.dtype) for v in eqn.invars)
        for eqn in _walk(jaxpr)
        if eqn.primitive.name == primitive
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit", "unet"])
def test_bfloat16_loss_is_close_to_float32(name: str) -> None:
    model, batch = _model(name), _batch(name)
    f32 = float(batch_loss(model, batch, KEYS))
    bf16 = float(batch_loss(cast_floating(model, jnp.bfloat16), batch, KEYS))
    assert np.isfinite(f32) and bf16 != f32
    assert bf16 == pytest.approx(f32, rel=BF16_REL_TOL)


@pytest.mark.parametrize("name", ["dit", "unet", "unet_time_token"])
def test_bfloat16_step_multiplies_in_bfloat16_only(name: str, getkey) -> None:
    optim = OptimConfig(lr=1e-3, precision="bfloat16")
    state = eqx.filter_eval_shape(
        init_train_state, _abstract_model(name), optim, key=getkey(), total_steps=10
    )
    step = make_train_step(LOSS_FN, optim, total_steps=10)
    jaxpr = eqx.filter_make_jaxpr(step)(state, _batch(name))[0].jaxpr
    dots = _operand_dtypes(jaxpr, "dot_general")
    convs = _operand_dtypes(jaxpr, "conv_general_dilated")
    assert len(dots) > 20
    if name.startswith("unet"):
        assert len(convs) > 10
    assert {d for operands in dots + convs for d in operands} == {"bfloat16"}


@pytest.mark.slow
def test_bfloat16_steps_train_and_keep_float32_state(getkey) -> None:
    name = "dit"
    batch = _batch(name)
    model = jax.tree_util.tree_map(lambda x: x.copy() if eqx.is_array(x) else x, _model(name))
    before = float(batch_loss(model, batch, KEYS))
    optim = OptimConfig(lr=3e-3, precision="bfloat16")
    state = init_train_state(model, optim, key=getkey(), total_steps=8)
    step = make_train_step(LOSS_FN, optim, total_steps=8)
    for _ in range(8):
        state, metrics = step(state, batch)
        assert float(metrics["debug/nonfinite"]) == 0.0
    after = float(batch_loss(state.model, batch, KEYS))
    assert after < before
    arrays = jax.tree_util.tree_leaves(
        eqx.filter((state.model, state.ema, state.opt_state), eqx.is_inexact_array)
    )
    assert {x.dtype for x in arrays} == {jnp.dtype(jnp.float32)}


def _checkpoints(jaxpr) -> int:
    """The number of `jax.checkpoint` equations ("remat2" in jax 0.10, "checkpoint" in others)."""
    names = [eqn.primitive.name for eqn in _walk(jaxpr)]
    return sum("remat" in n or "checkpoint" in n for n in names)


def _num_blocks(model: FSDM) -> int:
    """Checkpointed blocks: DiT blocks, or UNet residual and attention blocks; and the encoder."""
    denoiser = model.denoiser
    if isinstance(denoiser, DiT):
        return len(denoiser.blocks) + 1
    stages = [s for s in (*denoiser.down, *denoiser.up) if hasattr(s, "res")]
    residual = len(stages) + 2
    attention = sum(s.attn is not None for s in stages) + 1
    return residual + attention + 1


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_remat_checkpoints_every_block(name: str) -> None:
    batch = _batch(name)
    forward = [
        eqx.filter_make_jaxpr(batch_loss)(_abstract_model(name, remat), batch, KEYS)[0].jaxpr
        for remat in (False, True)
    ]
    assert _checkpoints(forward[0]) == 0
    assert _checkpoints(forward[1]) == _num_blocks(_abstract_model(name, True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit", "unet"])
def test_remat_gives_the_same_gradients(name: str) -> None:
    plain, remat = _model(name), _model(name, remat=True)
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same parameters
    batch = _batch(name)
    grad_fn = eqx.filter_jit(eqx.filter_grad(batch_loss))
    grads = [grad_fn(m, batch, KEYS) for m in (plain, remat)]
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    # the backward pass recomputes every block: a checkpoint per block there too
    jaxpr = eqx.filter_make_jaxpr(eqx.filter_grad(batch_loss))(remat, batch, KEYS)[0].jaxpr
    assert _checkpoints(jaxpr) >= _num_blocks(remat)


def test_remat_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat=1)  # pyright: ignore[reportArgumentType]
