"""Bits per dimension against a numpy computation of the bound for the optimal Gaussian denoiser.

For data N(mu, s^2 I) the optimal epsilon predictor is closed-form,
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), so every term of the
bound can be computed independently in float64 numpy (with scipy's normal CDF for the decoder).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fsdm_eqx.config import DiffusionConfig, EvalConfig
from fsdm_eqx.diffusion import beta_schedule, make_schedule
from fsdm_eqx.metrics.likelihood import (
    bits_per_dim,
    fewshot_likelihood,
    set_bits_per_dim,
    vlb_bpd_terms,
)

T = 20
S = 0.5
V = 0.3  # the constant variance channel of the learned-range model


def gaussian_model(abar_full: np.ndarray, mu, learned: bool):
    table = jnp.asarray(abar_full, dtype=jnp.float32)

    def model_fn(x_t, t):
        ab = table[t.astype(jnp.int32)]
        eps = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * S**2 + 1 - ab)
        return jnp.concatenate([eps, jnp.full_like(eps, V)]) if learned else eps

    return model_fn


def numpy_bound(x0, noise, mu, betas, abar_full, kept, variance, clip):
    abar = np.cumprod(1 - betas)
    n = betas.size
    terms = []
    for i in range(n):
        ab, ab_prev, beta = abar[i], (abar[i - 1] if i else 1.0), betas[i]
        x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise[i]
        ab_model = abar_full[kept[i]]
        eps = (
            np.sqrt(1 - ab_model)
            * (x_t - np.sqrt(ab_model) * mu)
            / (ab_model * S**2 + 1 - ab_model)
        )
        pred = (x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        if clip:
            pred = np.clip(pred, -1, 1)
        c1 = beta * np.sqrt(ab_prev) / (1 - ab)
        c2 = (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab)
        post = lambda j: betas[j] * (1 - (abar[j - 1] if j else 1.0)) / (1 - abar[j])  # noqa: E731
        small = post(i) if i else post(1)
        large = beta if i else post(1)
        if variance == "fixed_small":
            log_var = np.log(small)
        elif variance == "fixed_large":
            log_var = np.log(large)
        else:
            frac = (V + 1) / 2
            log_var = frac * np.log(beta) + (1 - frac) * np.log(small)
        mean = c1 * pred + c2 * x_t
        if i == 0:
            sd = np.exp(0.5 * log_var)
            upper, lower = (x0 + 1 / 255 - mean) / sd, (x0 - 1 / 255 - mean) / sd
            logp = np.where(
                x0 < -0.999,
                norm.logcdf(upper),
                np.where(x0 > 0.999, norm.logsf(lower), np.log(norm.cdf(upper) - norm.cdf(lower))),
            )
            terms.append(-logp.mean() / math.log(2))
        else:
            true_mean, true_var = c1 * x0 + c2 * x_t, post(i)
            kl = 0.5 * (-1 + log_var - np.log(true_var) + true_var / np.exp(log_var))
            kl = kl + 0.5 * (true_mean - mean) ** 2 / np.exp(log_var)
            terms.append(kl.mean() / math.log(2))
    ab_T = abar[-1]
    prior = (0.5 * (-1 - np.log(1 - ab_T) + (1 - ab_T) + ab_T * x0**2)).mean() / math.log(2)
    return np.array(terms), prior


@pytest.fixture(scope="module")
def image():
    u8 = np.array([[[0, 17, 128], [200, 255, 90]]])  # the end bins are exercised
    return u8 / 127.5 - 1.0


@pytest.mark.parametrize(
    "variance,clip,respaced",
    [
        ("fixed_small", False, None),
        ("fixed_large", True, None),
        ("learned_range", True, 6),
        ("fixed_small", True, 6),
    ],
)
def test_bound_matches_numpy(image, variance, clip, respaced):
    betas_full = beta_schedule("cosine", T)
    abar_full = np.cumprod(1 - betas_full)
    schedule = make_schedule("cosine", T, sampling_steps=respaced)
    kept = np.asarray(schedule.timesteps)
    abar_kept = abar_full[kept]
    betas = 1 - abar_kept / np.append(1.0, abar_kept[:-1])
    noise = np.random.default_rng(0).normal(size=(kept.size, *image.shape))
    mu = 0.1
    model = gaussian_model(abar_full, mu, variance == "learned_range")
    terms = jax.jit(
        lambda x, z: vlb_bpd_terms(
            model, schedule, x, z, variance=variance, clip_denoised=clip, steps_per_batch=4
        )
    )
    out = terms(jnp.asarray(image, jnp.float32), jnp.asarray(noise, jnp.float32))
    vb, prior = numpy_bound(image, noise, mu, betas, abar_full, kept, variance, clip)
    np.testing.assert_allclose(np.asarray(out["vb"]), vb, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(out["prior_bpd"]), prior, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(out["total_bpd"]), vb.sum() + prior, rtol=2e-4)
    assert out["mse"].shape == (kept.size,)


def test_bits_per_dim_draws_its_noise_from_the_key(image):
    schedule = make_schedule("cosine", T)
    model = gaussian_model(np.cumprod(1 - beta_schedule("cosine", T)), 0.0, False)
    x = jnp.asarray(image, jnp.float32)
    bpd = jax.jit(lambda key: bits_per_dim(model, schedule, x, key=key, variance="fixed_small"))
    a, b, c = bpd(jax.random.key(1)), bpd(jax.random.key(1)), bpd(jax.random.key(2))
    assert float(a["total_bpd"]) == float(b["total_bpd"]) != float(c["total_bpd"])


def conditional_gaussian(abar_full):
    def condition(context):
        return gaussian_model(abar_full, jnp.mean(context, axis=0), False)

    return condition


def test_each_image_is_scored_under_its_leave_one_out_context():
    abar_full = np.cumprod(1 - beta_schedule("cosine", T))
    schedule = make_schedule("cosine", T, sampling_steps=5)
    rng = np.random.default_rng(3)
    x_set = rng.integers(0, 256, size=(4, 1, 2, 2)) / 127.5 - 1.0
    noise = rng.normal(size=(4, 5, 1, 2, 2))
    out = jax.jit(
        lambda x, z: set_bits_per_dim(
            conditional_gaussian(abar_full), schedule, x, z, variance="fixed_small"
        )
    )(jnp.asarray(x_set, jnp.float32), jnp.asarray(noise, jnp.float32))

    @jax.jit
    def single(mu, x, z):
        model = gaussian_model(abar_full, mu, False)
        return vlb_bpd_terms(model, schedule, x, z, variance="fixed_small")["total_bpd"]

    for i in range(4):
        mu = np.delete(x_set, i, axis=0).mean(axis=0)
        args = (mu, x_set[i], noise[i])
        expected = single(*(jnp.asarray(a, jnp.float32) for a in args))
        np.testing.assert_allclose(out["total_bpd"][i], expected, rtol=1e-5)


def test_fewshot_likelihood_rewards_the_right_context():
    rng = np.random.default_rng(4)
    centres = np.array([30, 120, 220])
    labels = np.repeat([5, 6, 7], 12)
    pixels = centres[labels - 5][:, None, None, None] + 12 * rng.normal(size=(36, 1, 2, 2))
    images = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    abar_full = np.cumprod(1 - beta_schedule("cosine", T))
    diffusion = DiffusionConfig(
        num_steps=T, schedule="cosine", variance="fixed_small", loss="mse", sampling_steps=T
    )
    config = EvalConfig(ns=4, likelihood_sets=6, likelihood_steps=8, likelihood_batch_size=4)

    def class_blind(context):
        return gaussian_model(abar_full, jnp.float32(120 / 127.5 - 1), False)

    condition = conditional_gaussian(abar_full)
    fewshot = fewshot_likelihood(
        condition, images, labels, diffusion=diffusion, config=config, seen_in_training=False
    )
    blind = fewshot_likelihood(
        class_blind, images, labels, diffusion=diffusion, config=config, seen_in_training=False
    )
    assert fewshot.bpd < blind.bpd
    assert fewshot.num_images == 24 and fewshot.num_steps == 8 and fewshot.training_steps == T
    assert len(fewshot.vb_per_step) == 8 and fewshot.decoder_bpd == fewshot.vb_per_step[0]
    np.testing.assert_allclose(fewshot.bpd, sum(fewshot.vb_per_step) + fewshot.prior_bpd, rtol=1e-6)
    assert fewshot.distro == "out-distro" and fewshot.classes == (5, 6, 7)
    again = fewshot_likelihood(
        condition, images, labels, diffusion=diffusion, config=config, seen_in_training=True
    )
    assert again.bpd == fewshot.bpd and again.distro == "in-distro"  # the label only
    assert '"num_images": 24' in fewshot.to_json()
