"""A tiny two-subtree model and its per-set loss, shared by the training tests and scripts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class TinyModel(eqx.Module):
    """An encoder that pools a set into a context, and a denoiser conditioned on it."""

    encoder: eqx.nn.Linear
    denoiser: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.encoder = eqx.nn.Linear(4, 3, key=k1)
        self.denoiser = eqx.nn.Linear(4 + 3, 4, key=k2)


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
