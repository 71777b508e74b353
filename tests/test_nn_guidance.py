"""Classifier-free guidance on the context: the null context in training, the guided samplers.

References are built by hand from the denoiser and `diffusion.sample`, not from the guidance code:
w = 1 must be the plain conditional sampler exactly, w = 0 the sampler of the null-context model,
and any w the mix ``eps_null + w (eps_c - eps_null)`` in every sampler.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx import diffusion
from fsdm_eqx.config import DiffusionConfig, model_preset
from fsdm_eqx.nn import FSDM

CONFIG = dataclasses.replace(model_preset("smoke"), learned_variance=False, null_context_prob=0.3)
SHAPE = (CONFIG.channels, CONFIG.image_size, CONFIG.image_size)
BASE = DiffusionConfig(num_steps=50, sampling_steps=3, variance="fixed_small", loss="mse")


@pytest.fixture(scope="module")
def model():
    model = FSDM(CONFIG, key=jax.random.key(0))
    # a null context and weights away from the zero initialisation, so the branches differ
    null = jax.random.normal(jax.random.key(5), model.null_context.shape)
    model = eqx.tree_at(lambda m: m.null_context, model, null)
    leaves, tree = jax.tree.flatten(eqx.filter(model.denoiser, eqx.is_inexact_array))
    keys = jax.random.split(jax.random.key(6), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    denoiser = eqx.combine(jax.tree.unflatten(tree, leaves), model.denoiser)
    return eqx.tree_at(lambda m: m.denoiser, model, denoiser)


def _support():
    return jax.random.uniform(jax.random.key(7), (CONFIG.ns - 1, *SHAPE), minval=-1, maxval=1)


def _by_hand(model, support, key, config, eps_of):
    """`FSDM.sample`'s noise and keys, with the model function ``eps_of(eps_c, eps_null)``."""
    c = model.context(support, inference=True).c
    noise_key, sample_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (2, *SHAPE))

    def model_fn(x_t, t):
        eps_c = model.denoiser(x_t, t, c, inference=True)
        eps_null = model.denoiser(x_t, t, model.null_context, inference=True)
        return eps_of(eps_c, eps_null)

    def one(x, k):
        return diffusion.sample(model_fn, x, key=k, config=config)

    return jax.vmap(one)(x_T, jax.random.split(sample_key, 2))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ode"])
def test_guided_samplers_match_the_mix_built_by_hand(model, sampler, getkey):
    config = dataclasses.replace(BASE, sampler=sampler)
    support, key = _support(), getkey()

    @eqx.filter_jit
    def run(model, w):
        got = model.sample(support, 2, key=key, diffusion_config=config, guidance_scale=w)
        want = _by_hand(model, support, key, config, lambda c, n: n + w * (c - n))
        return got, want

    for w in (2.0, 1.5):
        got, want = run(model, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    plain = eqx.filter_jit(
        lambda m: m.sample(support, 2, key=key, diffusion_config=config, guidance_scale=1.0)
    )(model)
    cond = eqx.filter_jit(lambda m: _by_hand(m, support, key, config, lambda c, n: c))(model)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(cond))  # w = 1: exactly
    null = eqx.filter_jit(lambda m: _by_hand(m, support, key, config, lambda c, n: n))(model)
    guided_zero = eqx.filter_jit(
        lambda m: m.sample(support, 2, key=key, diffusion_config=config, guidance_scale=0.0)
    )(model)
    np.testing.assert_allclose(np.asarray(guided_zero), np.asarray(null), atol=1e-4)
    assert not np.allclose(np.asarray(plain), np.asarray(null), atol=1e-3)


def test_guidance_scale_defaults_to_the_diffusion_config(model, getkey):
    support, key = _support(), getkey()
    config = dataclasses.replace(BASE, sampler="ddim", guidance_scale=3.0)
    run = eqx.filter_jit(lambda m, c, w: m.sample(support, 2, key=key, diffusion_config=c,
                                                  guidance_scale=w))  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(run(model, config, None)),
        np.asarray(run(model, dataclasses.replace(config, guidance_scale=1.0), 3.0)),
    )


def test_null_context_is_seen_at_the_configured_rate(model, getkey):
    sets = jax.random.uniform(getkey(), (150, CONFIG.ns, *SHAPE), minval=-1, maxval=1)
    keys = jax.random.split(getkey(), len(sets))
    schedule = diffusion.make_schedule(BASE.schedule, BASE.num_steps)

    @eqx.filter_jit
    def seen(model, inference):
        def one(x, k):
            return model.loss(x, key=k, diffusion_config=BASE, schedule=schedule,
                              inference=inference)["context"]  # fmt: skip

        contexts = jax.vmap(one)(sets, keys)
        return jnp.all(contexts == model.null_context[None, None], axis=-1)

    is_null = np.asarray(seen(model, False))
    n = is_null.size  # 900 draws
    p = CONFIG.null_context_prob
    assert abs(is_null.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), is_null.mean()
    assert not np.asarray(seen(model, True)).any()  # evaluation never drops the context


def test_guidance_needs_a_null_context(getkey):
    plain = FSDM(dataclasses.replace(CONFIG, null_context_prob=0.0), key=getkey())
    assert plain.null_context is None
    with pytest.raises(ValueError, match="null_context_prob"):
        plain.sample(_support(), 1, key=getkey(), diffusion_config=BASE,
                     guidance_scale=2.0)  # fmt: skip
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffusionConfig(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="null_context_prob"):
        dataclasses.replace(CONFIG, null_context_prob=1.0)
