"""Gaussian posterior: the KL against its closed form for N(0, I) and a Monte Carlo estimate."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fsdm_eqx.nn import GaussianPosterior, gaussian_kl, reparameterize


def test_kl_to_standard_normal_matches_closed_form():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=50).astype(np.float32)
    logvar = rng.normal(size=50).astype(np.float32)
    kl = np.asarray(gaussian_kl(jnp.asarray(mu), jnp.asarray(logvar), jnp.zeros(50), jnp.zeros(50)))
    var = np.exp(logvar.astype(np.float64))
    ref = 0.5 * (mu.astype(np.float64) ** 2 + var - 1.0 - np.log(var))
    np.testing.assert_allclose(kl, ref, rtol=1e-5, atol=1e-6)
    same = gaussian_kl(jnp.asarray(mu), jnp.asarray(logvar), jnp.asarray(mu), jnp.asarray(logvar))
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


def test_kl_matches_monte_carlo():
    q_mu, q_logvar = np.array([0.3, -1.2, 2.0]), np.array([-0.5, 0.4, 0.0])
    p_mu, p_logvar = np.array([0.0, 0.5, 1.0]), np.array([0.2, -0.3, 1.0])
    kl = np.asarray(
        gaussian_kl(*(jnp.asarray(a, jnp.float32) for a in (q_mu, q_logvar, p_mu, p_logvar)))
    )
    rng = np.random.default_rng(1)
    n = 400_000
    q_sd, p_sd = np.exp(q_logvar / 2), np.exp(p_logvar / 2)
    z = q_mu + q_sd * rng.standard_normal((n, 3))
    log_ratio = stats.norm.logpdf(z, q_mu, q_sd) - stats.norm.logpdf(z, p_mu, p_sd)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    assert np.all(np.abs(kl - mc) < 5 * se + 1e-4), (kl, mc, se)


def test_posterior_head_and_reparameterisation(getkey):
    post = GaussianPosterior(6, key=getkey())
    mu, logvar = post(jnp.ones(6))
    assert mu.shape == logvar.shape == (6,)
    keys = jax.random.split(getkey(), 20_000)
    mu0, logvar0 = jnp.array([1.0, -2.0]), jnp.array([0.0, -1.0])
    z = np.asarray(jax.vmap(lambda k: reparameterize(mu0, logvar0, key=k))(keys))
    np.testing.assert_allclose(z.mean(0), [1.0, -2.0], atol=0.03)
    np.testing.assert_allclose(z.var(0), np.exp([0.0, -1.0]), rtol=0.04)
    grad = jax.grad(lambda m: reparameterize(m, logvar0, key=keys[0]).sum())(mu0)
    np.testing.assert_allclose(np.asarray(grad), 1.0)
