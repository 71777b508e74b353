"""The forward process, posterior, likelihood and losses against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from fsdm_eqx import DiffusionConfig
from fsdm_eqx.diffusion import (
    discretized_gaussian_log_likelihood,
    make_schedule,
    normal_kl,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    prior_bpd,
    q_posterior_mean_variance,
    q_sample,
    training_losses,
    vlb_terms_bpd,
)

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1 - BETAS)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", T)


@pytest.mark.parametrize("t", [0, 100, 999])
def test_q_sample_moments_match_closed_form(schedule, t: int, getkey) -> None:
    x0 = jnp.array([-0.8, 0.0, 0.5, 1.0])
    n = 200_000
    noise = jax.random.normal(getkey(), (n, 4))
    xt = jax.vmap(lambda e: q_sample(schedule, x0, jnp.asarray(t), e))(noise)
    mean, var = np.asarray(xt.mean(0)), np.asarray(xt.var(0))
    expected_mean, expected_var = np.sqrt(ABAR[t]) * np.asarray(x0), 1 - ABAR[t]
    se_mean = np.sqrt(expected_var / n)
    se_var = expected_var * np.sqrt(2 / n)
    np.testing.assert_array_less(np.abs(mean - expected_mean), 4 * se_mean)
    np.testing.assert_array_less(np.abs(var - expected_var), 4 * se_var)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_bayes_rule_of_the_forward_process(schedule, t: int) -> None:
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), a product of two Gaussians."""
    rng = np.random.default_rng(t)
    x0, xt = rng.normal(size=6), rng.normal(size=6)
    mean, var, log_var = q_posterior_mean_variance(
        schedule, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t)
    )
    alpha, beta, abar_prev = 1 - BETAS[t], BETAS[t], ABAR[t - 1]
    precision = alpha / beta + 1 / (1 - abar_prev)
    expected_mean = (
        np.sqrt(alpha) * xt / beta + np.sqrt(abar_prev) * x0 / (1 - abar_prev)
    ) / precision
    np.testing.assert_allclose(np.asarray(mean), expected_mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), np.full(6, 1 / precision), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(log_var), np.full(6, np.log(1 / precision)), rtol=1e-5)


def test_x0_and_eps_predictions_invert_q_sample(schedule, getkey) -> None:
    key_x, key_e = jax.random.split(getkey())
    x0 = jax.random.uniform(key_x, (3, 4, 4), minval=-1, maxval=1)
    eps = jax.random.normal(key_e, (3, 4, 4))
    for t in (0, 250, 999):
        tt = jnp.asarray(t)
        xt = q_sample(schedule, x0, tt, eps)
        np.testing.assert_allclose(predict_x0_from_eps(schedule, xt, tt, eps), x0, atol=2e-3)
        if t > 0:
            np.testing.assert_allclose(predict_eps_from_x0(schedule, xt, tt, x0), eps, atol=2e-3)


def test_normal_kl_matches_numerical_integral() -> None:
    m1, s1, m2, s2 = 0.3, 0.7, -0.5, 1.3

    def integrand(x: float) -> float:
        p = stats.norm(m1, s1)
        return p.pdf(x) * (p.logpdf(x) - stats.norm(m2, s2).logpdf(x))

    expected, _ = integrate.quad(integrand, -15, 15)
    args = [jnp.asarray(v, jnp.float32) for v in (m1, 2 * np.log(s1), m2, 2 * np.log(s2))]
    assert float(normal_kl(*args)) == pytest.approx(expected, rel=1e-5)


def test_discretized_likelihood_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, size=64) / 127.5 - 1.0).astype(np.float32)
    x[:2], x[2:4] = -1.0, 1.0
    means = rng.uniform(-1, 1, size=64).astype(np.float32)
    log_scales = rng.uniform(-5, 0, size=64).astype(np.float32)
    got = discretized_gaussian_log_likelihood(
        jnp.asarray(x), means=jnp.asarray(means), log_scales=jnp.asarray(log_scales)
    )
    dist = stats.norm(means.astype(np.float64), np.exp(log_scales.astype(np.float64)))
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    prob = dist.cdf(upper) - dist.cdf(lower)
    keep = prob > 1e-12
    assert keep.sum() > 8
    np.testing.assert_allclose(np.asarray(got)[keep], np.log(prob[keep]), rtol=2e-4, atol=2e-5)


def test_discretized_likelihood_is_a_distribution_over_256_values() -> None:
    grid = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    for mean, log_scale in ((0.1, -1.0), (-0.95, -3.0), (0.999, -6.0)):
        logp = discretized_gaussian_log_likelihood(
            grid, means=jnp.full(256, mean), log_scales=jnp.full(256, log_scale)
        )
        assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-4)


def test_p_mean_variance_with_true_noise_is_the_posterior(schedule, getkey) -> None:
    key_x, key_e = jax.random.split(getkey())
    x0 = jax.random.uniform(key_x, (2, 3, 3), minval=-0.9, maxval=0.9)
    eps = jax.random.normal(key_e, (2, 3, 3))
    t = jnp.asarray(300)
    xt = q_sample(schedule, x0, t, eps)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, xt, t)
    p = p_mean_variance(schedule, eps, xt, t, variance="fixed_small", clip_denoised=False)
    np.testing.assert_allclose(p.mean, true_mean, atol=1e-4)
    np.testing.assert_allclose(p.log_variance, true_log_var, rtol=1e-6)
    large = p_mean_variance(schedule, eps, xt, t, variance="fixed_large", clip_denoised=False)
    np.testing.assert_allclose(large.variance, np.full((2, 3, 3), BETAS[300]), rtol=1e-5)
    for v, expected in (
        (-1.0, np.log((1 - ABAR[299]) / (1 - ABAR[300]) * BETAS[300])),
        (1.0, np.log(BETAS[300])),
    ):
        out = jnp.concatenate([eps, jnp.full((2, 3, 3), v)])
        learned = p_mean_variance(
            schedule, out, xt, t, variance="learned_range", clip_denoised=False
        )
        np.testing.assert_allclose(learned.log_variance, np.full((2, 3, 3), expected), rtol=1e-5)
    with pytest.raises(ValueError, match="learned-variance model must output shape"):
        p_mean_variance(schedule, eps, xt, t, variance="learned_range")


def test_vlb_terms_are_the_kl_and_the_decoder_nll(schedule) -> None:
    x0 = jnp.linspace(-1, 1, 16).reshape(1, 4, 4)
    eps = jnp.full((1, 4, 4), 0.3)
    model_eps = jnp.full((1, 4, 4), 0.1)
    for t in (0, 10):
        tt = jnp.asarray(t)
        xt = q_sample(schedule, x0, tt, eps)
        got = float(vlb_terms_bpd(model_eps, schedule, x0, xt, tt, variance="fixed_small"))
        p = p_mean_variance(
            schedule, model_eps, xt, tt, variance="fixed_small", clip_denoised=False
        )
        mean, std = (
            np.asarray(p.mean, np.float64),
            np.exp(0.5 * np.asarray(p.log_variance, np.float64)),
        )
        x0_np, xt_np = np.asarray(x0, np.float64), np.asarray(xt, np.float64)
        if t == 0:
            upper = np.where(x0_np > 0.999, np.inf, x0_np + 1 / 255)
            lower = np.where(x0_np < -0.999, -np.inf, x0_np - 1 / 255)
            nats = -np.log(stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std))
        else:
            alpha, abar_prev = 1 - BETAS[t], ABAR[t - 1]
            precision = alpha / BETAS[t] + 1 / (1 - abar_prev)
            q_mean = (
                np.sqrt(alpha) * xt_np / BETAS[t] + np.sqrt(abar_prev) * x0_np / (1 - abar_prev)
            ) / precision
            q_std = np.sqrt(1 / precision)
            nats = np.log(std / q_std) + (q_std**2 + (q_mean - mean) ** 2) / (2 * std**2) - 0.5
        assert got == pytest.approx(nats.mean() / np.log(2), rel=1e-3)


def test_prior_bpd_matches_closed_form(schedule) -> None:
    x0 = jnp.array([0.5, -0.25])
    m, v = np.sqrt(ABAR[-1]) * np.asarray(x0), 1 - ABAR[-1]
    expected = np.mean(0.5 * (v + m**2 - 1 - np.log(v))) / np.log(2)
    assert float(prior_bpd(schedule, x0)) == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_training_draws_t_uniformly_and_reports_mse(getkey) -> None:
    """With x_0 = 0 and a model predicting eps_hat = t / T, E[mse] = 1 + E[(t / T)^2]."""
    small_t = 10
    schedule = make_schedule("linear", small_t)
    config = DiffusionConfig(
        num_steps=small_t, variance="fixed_small", loss="mse", sampling_steps=small_t
    )

    def model_fn(x_t, t):
        return jnp.ones_like(x_t) * t / small_t

    keys = jax.random.split(getkey(), 20_000)
    losses = jax.jit(
        jax.vmap(
            lambda k: training_losses(
                model_fn, schedule, jnp.zeros((1, 2, 2)), key=k, config=config
            )
        )
    )(keys)
    ts = np.arange(small_t)
    expected = 1 + np.mean((ts / small_t) ** 2)
    mse = np.asarray(losses["mse"])
    assert abs(mse.mean() - expected) < 4 * mse.std() / np.sqrt(mse.size)
    np.testing.assert_array_equal(np.asarray(losses["loss"]), mse)


def test_hybrid_loss_weights_the_bound_and_trains_only_the_variance(schedule, getkey) -> None:
    config = DiffusionConfig()
    x0 = jnp.linspace(-1, 1, 12).reshape(3, 2, 2)

    def loss_of(params, key):
        def model_fn(x_t, t):
            return jnp.concatenate(
                [params["eps"] * x_t, jnp.tanh(params["v"]) * jnp.ones_like(x_t)]
            )

        return training_losses(model_fn, schedule, x0, key=key, config=config, t=jnp.asarray(500))

    params = {"eps": jnp.asarray(0.5), "v": jnp.asarray(0.2)}
    key = getkey()
    terms = loss_of(params, key)
    assert float(terms["loss"]) == pytest.approx(
        float(terms["mse"] + 0.001 * T * terms["vb"]), rel=1e-6
    )
    grad_vb = jax.grad(lambda p: loss_of(p, key)["vb"])(params)
    grad_mse = jax.grad(lambda p: loss_of(p, key)["mse"])(params)
    assert float(grad_vb["eps"]) == 0.0 and float(grad_vb["v"]) != 0.0
    assert float(grad_mse["v"]) == 0.0 and float(grad_mse["eps"]) != 0.0
