"""The Gaussian diffusion as pure functions of one example (``jax.vmap`` over a batch outside).

Notation of Ho et al. (2020): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), the
posterior q(x_{t-1} | x_t, x_0) of their eqs. 6-7, epsilon prediction. The learned variance and
the hybrid loss follow Nichol & Dhariwal (2021). ``t`` indexes the steps of ``schedule``; for a
respaced schedule the model is called with ``schedule.timesteps[t]``, the training timestep that
step stands for.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..config import DiffusionConfig, VarianceType
from .schedule import Schedule

ModelFn = Callable[[Float[Array, "*shape"], Float[Array, ""]], Float[Array, "..."]]
"""A denoiser for one example: ``(x_t, t) -> prediction``, ``t`` a float training timestep."""


class PMeanVariance(NamedTuple):
    """The reverse step p(x_{t-1} | x_t) implied by a model output."""

    mean: Array
    variance: Array
    log_variance: Array
    pred_x0: Array
    eps: Array


def q_mean_variance(
    schedule: Schedule, x_start: Float[Array, "*shape"], t: Int[Array, ""]
) -> tuple[Float[Array, "*shape"], Float[Array, ""], Float[Array, ""]]:
    """Mean, variance and log-variance of q(x_t | x_0)."""
    abar = schedule.alphas_cumprod[t]
    return schedule.sqrt_alphas_cumprod[t] * x_start, 1.0 - abar, jnp.log1p(-abar)


def q_sample(
    schedule: Schedule,
    x_start: Float[Array, "*shape"],
    t: Int[Array, ""],
    noise: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise."""
    return (
        schedule.sqrt_alphas_cumprod[t] * x_start
        + schedule.sqrt_one_minus_alphas_cumprod[t] * noise
    )


def q_posterior_mean_variance(
    schedule: Schedule,
    x_start: Float[Array, "*shape"],
    x_t: Float[Array, "*shape"],
    t: Int[Array, ""],
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"], Float[Array, "*shape"]]:
    """Mean, variance and (clipped) log-variance of q(x_{t-1} | x_t, x_0), Ho et al. eqs. 6-7.

    The variance and log-variance are broadcast to the shape of ``x_t``.
    """
    mean = schedule.posterior_mean_coef1[t] * x_start + schedule.posterior_mean_coef2[t] * x_t
    variance = jnp.broadcast_to(schedule.posterior_variance[t], x_t.shape)
    log_variance = jnp.broadcast_to(schedule.posterior_log_variance_clipped[t], x_t.shape)
    return mean, variance, log_variance


def predict_x0_from_eps(
    schedule: Schedule,
    x_t: Float[Array, "*shape"],
    t: Int[Array, ""],
    eps: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        schedule.sqrt_recip_alphas_cumprod[t] * x_t - schedule.sqrt_recipm1_alphas_cumprod[t] * eps
    )


def predict_eps_from_x0(
    schedule: Schedule,
    x_t: Float[Array, "*shape"],
    t: Int[Array, ""],
    x0: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """The epsilon that maps x_0 to x_t: the inverse of `predict_x0_from_eps`."""
    return (
        schedule.sqrt_recip_alphas_cumprod[t] * x_t - x0
    ) / schedule.sqrt_recipm1_alphas_cumprod[t]


def split_model_output(
    model_output: Float[Array, "..."], x_t: Float[Array, "*shape"], *, variance: VarianceType
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"] | None]:
    """Split a model output into epsilon and, for a learned variance, the variance channels.

    A learned-variance model stacks [eps, v] along the first (channel) axis.
    """
    if variance == "learned_range":
        expected = (2 * x_t.shape[0], *x_t.shape[1:])
        if model_output.shape != expected:
            raise ValueError(
                f"A learned-variance model must output shape {expected} for x_t of shape "
                f"{x_t.shape}, got {model_output.shape}."
            )
        eps, v = jnp.split(model_output, 2, axis=0)
        return eps, v
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"A fixed-variance model must output the shape of x_t {x_t.shape}, "
            f"got {model_output.shape}."
        )
    return model_output, None


def p_mean_variance(
    schedule: Schedule,
    model_output: Float[Array, "..."],
    x_t: Float[Array, "*shape"],
    t: Int[Array, ""],
    *,
    variance: VarianceType,
    clip_denoised: bool = True,
) -> PMeanVariance:
    """The reverse step p(x_{t-1} | x_t) from an epsilon-predicting model output.

    **Arguments:**
    - `schedule`: the (possibly respaced) schedule; `t` indexes its steps.
    - `model_output`: eps, or [eps, v] stacked on the channel axis for `learned_range`, where the
      log-variance is v' log(beta_t) + (1 - v') log(posterior variance), v' = (v + 1) / 2.
    - `x_t`: the current sample.
    - `variance`: how the variance is chosen (see `DiffusionConfig.variance`).
    - `clip_denoised`: clip the predicted x_0 to [-1, 1] before forming the mean.

    **Returns:** a `PMeanVariance` with the mean, variance, log-variance, predicted x_0 and eps.
    """
    eps, v = split_model_output(model_output, x_t, variance=variance)
    if v is None:
        log_variance = jnp.broadcast_to(schedule.model_log_variance(variance)[t], x_t.shape)
    else:
        min_log = schedule.posterior_log_variance_clipped[t]
        max_log = jnp.log(schedule.betas[t])
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    pred_x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return PMeanVariance(mean, jnp.exp(log_variance), log_variance, pred_x0, eps)


def normal_kl(
    mean1: Float[Array, "*shape"],
    logvar1: Float[Array, "*shape"],
    mean2: Float[Array, "*shape"],
    logvar2: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: Float[Array, "*shape"], *, means: Float[Array, "*shape"], log_scales: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """Elementwise log-probability of 8-bit data in [-1, 1] under a discretised Gaussian.

    Each of the 256 values owns a bin of width 2/255; the end bins extend to -inf and +inf
    (Ho et al. 2020, eq. 13). Uses the exact normal CDF, where improved DDPM uses a tanh
    approximation.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = log_ndtr(upper)
    log_sf_lower = log_ndtr(-lower)
    # Difference of CDFs computed in the tail where it does not cancel.
    delta = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_delta = jnp.log(jnp.maximum(delta, 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))


def vlb_terms_bpd(
    model_output: Float[Array, "..."],
    schedule: Schedule,
    x_start: Float[Array, "*shape"],
    x_t: Float[Array, "*shape"],
    t: Int[Array, ""],
    *,
    variance: VarianceType,
    clip_denoised: bool = False,
) -> Float[Array, ""]:
    """The variational-bound term L_t in bits per dimension.

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's negative
    log-likelihood -log p(x_0 | x_1) of the discretised data at t = 0. ``clip_denoised`` clips
    the predicted x_0 inside p, as a sampler that clips would.
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x_start, x_t, t)
    p = p_mean_variance(
        schedule, model_output, x_t, t, variance=variance, clip_denoised=clip_denoised
    )
    kl = jnp.mean(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
    nll = -jnp.mean(
        discretized_gaussian_log_likelihood(x_start, means=p.mean, log_scales=0.5 * p.log_variance)
    ) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def prior_bpd(schedule: Schedule, x_start: Float[Array, "*shape"]) -> Float[Array, ""]:
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: the prior term of the bound."""
    t = jnp.asarray(schedule.num_steps - 1)
    mean, _, log_var = q_mean_variance(schedule, x_start, t)
    zeros = jnp.zeros_like(mean)
    kl = normal_kl(mean, jnp.broadcast_to(log_var, mean.shape), zeros, zeros)
    return jnp.mean(kl) / math.log(2.0)


def training_losses(
    model_fn: ModelFn,
    schedule: Schedule,
    x_start: Float[Array, "*shape"],
    *,
    key: PRNGKeyArray,
    config: DiffusionConfig,
    t: Int[Array, ""] | None = None,
) -> dict[str, Float[Array, ""]]:
    """The training loss of one example, with t drawn uniformly from the schedule's steps.

    **Arguments:**
    - `model_fn`: the denoiser for this example, `(x_t, t) -> eps` or `[eps, v]`.
    - `schedule`: the training schedule.
    - `x_start`: the clean example x_0.
    - `key`: draws t (unless given) and the noise.
    - `config`: chooses the variance and the loss.
    - `t`: a fixed step instead of a uniform draw.

    **Returns:** `mse` (epsilon MSE, mean over dimensions), `vb` (the bound term L_t in bits per
    dimension, with the mean prediction frozen so it trains the variance only) and `loss`:
    `mse` for `loss="mse"`, `mse + vlb_weight * T * vb` for `loss="hybrid"` (T * L_t estimates
    L_vlb = sum_t L_t, so vlb_weight = 0.001 is lambda of Nichol & Dhariwal).
    """
    t_key, noise_key = jax.random.split(key)
    if t is None:
        t = jax.random.randint(t_key, (), 0, schedule.num_steps)
    noise = jax.random.normal(noise_key, x_start.shape, x_start.dtype)
    x_t = q_sample(schedule, x_start, t, noise)
    output = model_fn(x_t, schedule.timesteps[t].astype(x_t.dtype))
    eps, v = split_model_output(output, x_t, variance=config.variance)
    mse = jnp.mean((noise - eps) ** 2)
    frozen = (
        jax.lax.stop_gradient(eps)
        if v is None
        else jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=0)
    )
    vb = vlb_terms_bpd(frozen, schedule, x_start, x_t, t, variance=config.variance)
    weight = config.vlb_weight * schedule.num_steps if config.loss == "hybrid" else 0.0
    loss = mse + weight * vb
    return {"loss": loss, "mse": mse, "vb": vb}
