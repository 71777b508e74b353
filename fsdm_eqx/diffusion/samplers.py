"""Samplers for one example: DDPM ancestral, DDIM, and the probability-flow ODE through diffrax.

Each takes a model function ``(x_t, t) -> prediction`` for one example and the starting noise
``x_T``, runs its steps in ``lax.scan`` (or an adaptive diffrax solve) and is batched by
``jax.vmap`` outside. The model is always called with training timesteps, so a respaced schedule
(``make_schedule(..., sampling_steps=n)``) samples with a model trained on the full one.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ..config import DiffusionConfig, VarianceType
from .gaussian import (
    ModelFn,
    PMeanVariance,
    p_mean_variance,
    predict_eps_from_x0,
    split_model_output,
)
from .schedule import Schedule, continuous_timestep, log_sigma, make_schedule


def _ancestral_walk(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: Float[Array, "*shape"],
    key: PRNGKeyArray,
    update: Callable[[Array, Array, PMeanVariance, Array], Array],
    *,
    variance: VarianceType,
    clip_denoised: bool,
) -> Float[Array, "*shape"]:
    """Walk the schedule from step n - 1 down to 0 in one ``lax.scan``: at step ``i`` the model's
    `p_mean_variance` ``p`` at ``x`` and fresh noise ``z`` give the next ``update(x, i, p, z)``.
    The noise of every step comes from ``key``."""
    keys = jax.random.split(key, schedule.num_steps)

    def step(x: Array, inputs: tuple[Array, Array]) -> tuple[Array, None]:
        i, step_key = inputs
        out = model_fn(x, schedule.timesteps[i].astype(x.dtype))
        p = p_mean_variance(schedule, out, x, i, variance=variance, clip_denoised=clip_denoised)
        noise = jax.random.normal(step_key, x.shape, x.dtype)
        return update(x, i, p, noise), None

    steps = jnp.arange(schedule.num_steps - 1, -1, -1)
    x0, _ = jax.lax.scan(step, x_T, (steps, keys[steps]))
    return x0


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: Float[Array, "*shape"],
    *,
    key: PRNGKeyArray,
    variance: VarianceType,
    clip_denoised: bool = True,
) -> Float[Array, "*shape"]:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) from step n - 1 down to 0 (Ho et al. 2020).

    **Arguments:**
    - `model_fn`: the denoiser for one example.
    - `schedule`: the schedule to walk, full or respaced.
    - `x_T`: the starting noise, N(0, I).
    - `key`: the noise of every step.
    - `variance`: the reverse variance (see `DiffusionConfig.variance`).
    - `clip_denoised`: clip the predicted x_0 to [-1, 1] at each step.

    **Returns:** the sample x_0.
    """

    def update(x: Array, i: Array, p: PMeanVariance, noise: Array) -> Array:
        del x
        return p.mean + jnp.where(i > 0, jnp.exp(0.5 * p.log_variance), 0.0) * noise

    return _ancestral_walk(
        model_fn, schedule, x_T, key, update, variance=variance, clip_denoised=clip_denoised
    )


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: Float[Array, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    eta: float = 0.0,
    variance: VarianceType,
    clip_denoised: bool = True,
) -> Float[Array, "*shape"]:
    """DDIM (Song et al. 2021, eq. 12) from step n - 1 down to 0.

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps + sigma_t z with
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}). With
    eta = 0 it is deterministic given x_T; with eta = 1 its marginals are DDPM's with the posterior
    variance. When x0_hat is clipped, eps is recomputed from it.

    **Arguments:** as `ddpm_sample`, plus `eta`; `key` is needed only when eta > 0.

    **Returns:** the sample x_0.
    """
    if eta > 0 and key is None:
        raise ValueError("ddim_sample with eta > 0 draws noise: pass a key.")
    key = jax.random.key(0) if key is None else key

    def update(x: Array, i: Array, p: PMeanVariance, noise: Array) -> Array:
        eps = predict_eps_from_x0(schedule, x, i, p.pred_x0)
        abar, abar_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        mean = (
            jnp.sqrt(abar_prev) * p.pred_x0
            + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps
        )
        return mean + jnp.where(i > 0, sigma, 0.0) * noise

    return _ancestral_walk(
        model_fn, schedule, x_T, key, update, variance=variance, clip_denoised=clip_denoised
    )


def ode_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: Float[Array, "*shape"],
    *,
    variance: VarianceType,
    clip_denoised: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_steps: int = 4096,
) -> Float[Array, "*shape"]:
    """Solve the probability-flow ODE with an adaptive Runge-Kutta solver (diffrax Tsit5).

    In y = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar) the flow is dy/dsigma = eps(x, t)
    (Song et al. 2021, eq. 14, whose Euler discretisation is DDIM with eta = 0); it is integrated
    in s = log sigma from the last step's noise level to the first's, then the last denoising
    step x_0 = y - sigma_0 eps is taken as DDIM does. The model sees the fractional timestep of
    each noise level (`continuous_timestep`).

    The vector field never clips: with `clip_denoised` only the final x_0 is clipped to
    [-1, 1], so that the solver integrates the smooth probability-flow ODE.

    **Arguments:** as `ddpm_sample`, without a key, plus the solver's `rtol`, `atol` and
    `max_steps`.

    **Returns:** the sample x_0. A solve that would need more than `max_steps` steps stops with
    an error that says so (raise `DiffusionConfig.ode_max_steps`, loosen the tolerances or use
    the DDIM sampler), never with a partial sample.
    """
    log_sigmas = log_sigma(schedule)
    s_start, s_end = log_sigmas[-1], log_sigmas[0]

    def denoised(s: ArrayLike, y: Array) -> Array:
        s = jnp.asarray(s, dtype=y.dtype)
        sigma = jnp.exp(s)
        x = y / jnp.sqrt(1.0 + sigma**2)
        t = continuous_timestep(schedule, s)
        eps, _ = split_model_output(model_fn(x, t), x, variance=variance)
        return y - sigma * eps

    def vector_field(s: ArrayLike, y: Array, args: None) -> Array:
        del args
        return y - denoised(s, y)  # sigma * eps, i.e. dy/ds = sigma dy/dsigma

    y_T = x_T * jnp.sqrt(1.0 + jnp.exp(2.0 * s_start))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Tsit5(),
        t0=s_start,
        t1=s_end,
        dt0=None,
        y0=y_T,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
    )
    assert solution.ys is not None
    x0 = denoised(s_end, solution.ys[-1])
    x0 = eqx.error_if(
        x0,
        solution.result != diffrax.RESULTS.successful,
        f"the probability-flow ODE solver did not reach the end within max_steps={max_steps} "
        "steps; raise DiffusionConfig.ode_max_steps, loosen ode_rtol/ode_atol, or sample with "
        "sampler='ddim'.",
    )
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0


def sample(
    model_fn: ModelFn,
    x_T: Float[Array, "*shape"],
    *,
    key: PRNGKeyArray,
    config: DiffusionConfig,
) -> Float[Array, "*shape"]:
    """Sample one example with the sampler, steps and variance that ``config`` names.

    DDPM and DDIM walk the schedule respaced to `config.sampling_steps`; the ODE solver chooses
    its own steps on the full schedule.
    """
    if config.sampler == "ode":
        full = make_schedule(config.schedule, config.num_steps)
        return ode_sample(
            model_fn,
            full,
            x_T,
            variance=config.variance,
            clip_denoised=config.clip_denoised,
            rtol=config.ode_rtol,
            atol=config.ode_atol,
            max_steps=config.ode_max_steps,
        )
    schedule = make_schedule(
        config.schedule, config.num_steps, sampling_steps=config.sampling_steps
    )
    if config.sampler == "ddim":
        return ddim_sample(
            model_fn,
            schedule,
            x_T,
            key=key,
            eta=config.ddim_eta,
            variance=config.variance,
            clip_denoised=config.clip_denoised,
        )
    return ddpm_sample(
        model_fn,
        schedule,
        x_T,
        key=key,
        variance=config.variance,
        clip_denoised=config.clip_denoised,
    )
