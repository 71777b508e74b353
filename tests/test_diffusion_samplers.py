"""Samplers reproduce Gaussian data N(mu, s^2 I) with its analytically optimal denoiser."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx import DiffusionConfig
from fsdm_eqx.diffusion import (
    continuous_alpha_bar,
    ddim_sample,
    ddpm_sample,
    make_schedule,
    ode_sample,
    sample,
)

MU, S = 0.3, 0.5
SHAPE = (2, 4, 4)
BATCH = 256
N = BATCH * int(np.prod(SHAPE))
FULL = make_schedule("linear", 1000)


def optimal_eps(x_t, t):
    """E[eps | x_t] for x_0 ~ N(MU, S^2 I): a Gaussian conditional expectation in closed form."""
    abar = continuous_alpha_bar(FULL, t)
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)


def learned_optimal(x_t, t):
    """The optimal epsilon with a learned-variance head that picks the posterior variance."""
    return jnp.concatenate([optimal_eps(x_t, t), -jnp.ones_like(x_t)])


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(0), (BATCH, *SHAPE))


def batched(sampler, x_T, key=None):
    keys = jax.random.split(jax.random.key(1) if key is None else key, x_T.shape[0])
    run = eqx.filter_jit(jax.vmap(sampler))
    return np.asarray(run(x_T, keys))


def assert_matches_target(samples: np.ndarray) -> None:
    mean, std = samples.mean(), samples.std()
    assert abs(mean - MU) < 3 * S / np.sqrt(N), (mean, MU)
    assert abs(std - S) < 3 * S / np.sqrt(2 * N), (std, S)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_reproduces_gaussian_data(x_T, variance: str) -> None:
    model = learned_optimal if variance == "learned_range" else optimal_eps
    out = batched(
        lambda x, k: ddpm_sample(model, FULL, x, key=k, variance=variance, clip_denoised=False), x_T
    )
    assert_matches_target(out)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_gaussian_data(x_T, eta: float) -> None:
    out = batched(
        lambda x, k: ddim_sample(
            optimal_eps, FULL, x, key=k, eta=eta, variance="fixed_small", clip_denoised=False
        ),
        x_T,
    )
    assert_matches_target(out)


def test_ode_reproduces_gaussian_data(x_T) -> None:
    out = batched(
        lambda x, k: ode_sample(optimal_eps, FULL, x, variance="fixed_small", rtol=1e-5, atol=1e-5),
        x_T,
    )
    assert_matches_target(out)


def test_respaced_ddim_reproduces_gaussian_data(x_T) -> None:
    short = make_schedule("linear", 1000, sampling_steps=250)
    out = batched(
        lambda x, k: ddim_sample(
            optimal_eps, short, x, variance="fixed_small", clip_denoised=False
        ),
        x_T,
    )
    assert_matches_target(out)


def test_ddim_eta0_is_deterministic_and_agrees_with_the_ode(x_T, getkey) -> None:
    def ddim(x, k):
        return ddim_sample(optimal_eps, FULL, x, key=k, variance="fixed_small", clip_denoised=False)

    a = batched(ddim, x_T[:16], key=getkey())
    b = batched(ddim, x_T[:16], key=getkey())
    np.testing.assert_array_equal(a, b)
    ode = batched(
        lambda x, k: ode_sample(optimal_eps, FULL, x, variance="fixed_small", rtol=1e-6, atol=1e-6),
        x_T[:16],
    )
    # DDIM is the Euler method of the same ODE: with 1000 steps they agree to discretisation error.
    assert np.max(np.abs(a - ode)) < 5e-3


def test_ddpm_and_ddim_eta1_differ_pathwise_but_not_in_law(x_T, getkey) -> None:
    ddpm = batched(
        lambda x, k: ddpm_sample(
            optimal_eps, FULL, x, key=k, variance="fixed_small", clip_denoised=False
        ),
        x_T,
    )
    ddim = batched(
        lambda x, k: ddim_sample(
            optimal_eps, FULL, x, key=k, eta=1.0, variance="fixed_small", clip_denoised=False
        ),
        x_T,
        key=getkey(),
    )
    assert np.abs(ddpm - ddim).mean() > 0.1
    assert abs(ddpm.std() - ddim.std()) < 4 * S / np.sqrt(N)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ode"])
def test_sample_dispatches_on_the_config(x_T, sampler: str) -> None:
    config = DiffusionConfig(
        variance="fixed_small",
        loss="mse",
        sampler=sampler,
        sampling_steps=100,
        ddim_eta=0.5,
        clip_denoised=True,
    )
    out = batched(lambda x, k: sample(optimal_eps, x, key=k, config=config), x_T[:64])
    respaced = make_schedule("linear", 1000, sampling_steps=100)
    direct = {
        "ddpm": lambda x, k: ddpm_sample(optimal_eps, respaced, x, key=k, variance="fixed_small"),
        "ddim": lambda x, k: ddim_sample(
            optimal_eps, respaced, x, key=k, eta=0.5, variance="fixed_small"
        ),
        "ode": lambda x, k: ode_sample(
            optimal_eps, FULL, x, variance="fixed_small", clip_denoised=True
        ),
    }
    expected = {name: batched(fn, x_T[:64]) for name, fn in direct.items()}
    np.testing.assert_allclose(out, expected[sampler], atol=1e-5)
    for other in set(direct) - {sampler}:
        assert np.abs(out - expected[other]).max() > 1e-3
    assert np.all(np.abs(out) <= 1.0 + 1e-6)
    assert abs(out.mean() - MU) < 0.05


def test_ode_clips_only_its_final_sample(x_T) -> None:
    """Wide data (s = 2) puts x_0 predictions outside [-1, 1] along the path: clipping inside
    the vector field would change the trajectory, clipping the end point does not."""

    def wide_eps(x_t, t):
        abar = continuous_alpha_bar(FULL, t)
        return jnp.sqrt(1 - abar) * x_t / (abar * 4.0 + 1 - abar)

    def solve(clip: bool):
        return batched(
            lambda x, k: ode_sample(wide_eps, FULL, x, variance="fixed_small", clip_denoised=clip),
            x_T[:16],
        )

    free = solve(False)
    assert np.mean(np.abs(free) > 1) > 0.3
    np.testing.assert_allclose(solve(True), np.clip(free, -1, 1), atol=1e-6)


def test_ode_out_of_steps_is_one_clear_error(x_T) -> None:
    config = DiffusionConfig(variance="fixed_small", loss="mse", sampler="ode", ode_max_steps=3)
    with pytest.raises(Exception, match=r"raise DiffusionConfig\.ode_max_steps"):
        batched(lambda x, k: sample(optimal_eps, x, key=k, config=config), x_T[:2])
