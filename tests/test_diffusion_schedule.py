"""Schedules against their formulas (Ho et al. 2020; Nichol & Dhariwal 2021)."""

import math

import numpy as np
import pytest

from fsdm_eqx.diffusion import make_schedule, space_timesteps


@pytest.mark.parametrize("num_steps", [100, 1000, 4000])
def test_linear_betas_follow_ho_et_al(num_steps: int) -> None:
    s = make_schedule("linear", num_steps)
    scale = 1000 / num_steps
    expected = [
        scale * 1e-4 + i * (scale * 0.02 - scale * 1e-4) / (num_steps - 1) for i in range(num_steps)
    ]
    np.testing.assert_allclose(np.asarray(s.betas), expected, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(s.alphas_cumprod), np.cumprod(1 - np.array(expected)), rtol=1e-5
    )


@pytest.mark.parametrize("num_steps", [50, 1000])
def test_cosine_alpha_bar_follows_nichol_dhariwal(num_steps: int) -> None:
    s = make_schedule("cosine", num_steps)

    def f(t: float) -> float:
        return math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2

    expected_betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(num_steps)]
    np.testing.assert_allclose(np.asarray(s.betas), expected_betas, rtol=1e-5)
    # Away from the clipped end, alpha_bar_t = f(t + 1) / f(0) exactly.
    expected_ab = [f(t + 1) / f(0) for t in range(num_steps - 5)]
    np.testing.assert_allclose(
        np.asarray(s.alphas_cumprod[: num_steps - 5]), expected_ab, rtol=1e-4, atol=1e-7
    )


def test_derived_quantities_match_ho_et_al_eq7() -> None:
    s = make_schedule("linear", 1000)
    b = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(
        np.asarray(s.posterior_variance), (1 - ab_prev) / (1 - ab) * b, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(s.posterior_mean_coef1), np.sqrt(ab_prev) * b / (1 - ab), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(s.posterior_mean_coef2), np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab), rtol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(1000))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respacing_keeps_alpha_bar_on_kept_steps(name: str) -> None:
    full = make_schedule(name, 1000)
    short = make_schedule(name, 1000, sampling_steps=50)
    kept = np.asarray(short.timesteps)
    assert short.num_steps == 50 and kept[0] == 0 and kept[-1] == 999
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_allclose(
        np.asarray(short.alphas_cumprod), np.asarray(full.alphas_cumprod)[kept], rtol=1e-5
    )


def test_linear_betas_are_clipped_for_tiny_t() -> None:
    s = make_schedule("linear", 10)
    assert float(s.betas.max()) == pytest.approx(0.999)


def test_space_timesteps_is_even() -> None:
    np.testing.assert_array_equal(space_timesteps(10, 4), [0, 3, 6, 9])
    with pytest.raises(ValueError, match="sampling steps"):
        space_timesteps(10, 11)


def test_unknown_schedule_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="'quadratic'"):
        make_schedule("quadratic", 10)  # type: ignore[arg-type]
