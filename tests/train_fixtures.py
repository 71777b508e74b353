"""A tiny two-subtree model, its per-set loss, its training state, step and batches, shared by
the training tests and scripts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from fsdm_eqx.config import OptimConfig
from fsdm_eqx.train import TrainState, init_train_state, make_train_step
from fsdm_eqx.train.step import StepFn

OPTIM = OptimConfig(lr=1e-2, ema_start=0, ema_every=1, ema_decay=0.9)
"""A constant learning rate, and an EMA from the first step."""
TOTAL_STEPS = 20
"""The schedule's horizon in `fresh_state` and `make_tiny_step`; the tests' runs are shorter."""


class TinyModel(eqx.Module):
    """An encoder that pools a set into a context (``context_dim`` wide, 3 by default), and a
    denoiser conditioned on it."""

    encoder: eqx.nn.Linear
    denoiser: eqx.nn.Linear

    def __init__(self, key, context_dim: int = 3):
        k1, k2 = jax.random.split(key)
        self.encoder = eqx.nn.Linear(4, context_dim, key=k1)
        self.denoiser = eqx.nn.Linear(4 + context_dim, 4, key=k2)


def tiny_context(model: TinyModel, x_set):
    """The set's context, ``(1, 3)``."""
    dtype = model.encoder.weight.dtype
    return model.encoder(jnp.mean(x_set.astype(dtype), axis=0))[None]


def tiny_noise(key, x_set):
    """The noise ``tiny_loss`` draws. (With the rbg PRNG a draw under `jax.vmap` differs from
    the same draw outside it: vmap this as the step vmaps the loss.)"""
    return jax.random.normal(key, x_set.shape)


def tiny_loss_given_context(model: TinyModel, x_set, noise, context):
    """The loss of ``tiny_loss`` with the noise and the context given explicitly."""
    dtype = model.encoder.weight.dtype
    x_set = x_set.astype(dtype)
    noise = noise.astype(dtype)
    inputs = jnp.concatenate([x_set + noise, jnp.broadcast_to(context, (x_set.shape[0], 3))], 1)
    pred = jax.vmap(model.denoiser)(inputs)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise.astype(jnp.float32)))


def tiny_loss(model: TinyModel, x_set, key, *, context_offset=None):
    """Denoise each set member from noise, conditioned on the set's pooled context."""
    context = tiny_context(model, x_set)
    if context_offset is not None:
        context = context + context_offset
    mse = tiny_loss_given_context(model, x_set, tiny_noise(key, x_set), context)
    return mse, {"mse": mse, "context": context}


def tiny_batches(num: int, batch: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, 5, 4)).astype(np.float32) for _ in range(num)]


def loop_batch(step: int, seed: int = 0) -> np.ndarray:
    """The batch of one step of a run, ``(8, 5, 4)``: the same for the same step and seed, so
    that a resumed run sees the batches a straight run saw."""
    return np.random.default_rng([seed, step]).normal(size=(8, 5, 4)).astype(np.float32)


def fresh_state(optim: OptimConfig = OPTIM, total_steps: int = TOTAL_STEPS) -> TrainState:
    """The tiny model's training state before its first step, the same at every call."""
    key = jax.random.key(0)
    return init_train_state(
        TinyModel(key), optim, key=jax.random.fold_in(key, 1), total_steps=total_steps
    )


def make_tiny_step(optim: OptimConfig = OPTIM, total_steps: int = TOTAL_STEPS) -> StepFn:
    """The jitted training step of ``tiny_loss``."""
    return make_train_step(tiny_loss, optim, total_steps=total_steps)
