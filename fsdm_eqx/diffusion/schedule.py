"""Beta schedules and their derived quantities, computed in float64 and stored as a PyTree.

Linear: Ho et al. (2020), betas from 1e-4 to 0.02 for T = 1000, scaled by 1000 / T for other T
(improved DDPM's convention, so that any T spans the same noise levels). Cosine: Nichol & Dhariwal
(2021), alpha_bar(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2), s = 0.008, betas clipped at 0.999.
Respacing keeps a subset of timesteps and recomputes the betas so that alpha_bar is unchanged on
that subset (improved DDPM, section 4).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..config import VarianceType


class Schedule(eqx.Module):
    """A discrete noise schedule: per-step arrays of length ``num_steps`` (float32 on device).

    ``timesteps[i]`` is the training timestep that step ``i`` stands for: ``i`` itself for a full
    schedule, the kept timesteps for a respaced one. The model is always called with
    ``timesteps[i]``.
    """

    betas: Float[Array, " n"]
    alphas_cumprod: Float[Array, " n"]
    alphas_cumprod_prev: Float[Array, " n"]
    sqrt_alphas_cumprod: Float[Array, " n"]
    sqrt_one_minus_alphas_cumprod: Float[Array, " n"]
    sqrt_recip_alphas_cumprod: Float[Array, " n"]
    sqrt_recipm1_alphas_cumprod: Float[Array, " n"]
    posterior_variance: Float[Array, " n"]
    posterior_log_variance_clipped: Float[Array, " n"]
    posterior_mean_coef1: Float[Array, " n"]
    posterior_mean_coef2: Float[Array, " n"]
    timesteps: Int[Array, " n"]

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def model_log_variance(self, variance: VarianceType) -> Float[Array, " n"]:
        """Log-variance of a fixed reverse process (``fixed_small`` or ``fixed_large``).

        ``fixed_large`` uses beta_t, except at t = 0 where it uses the posterior variance of
        step 1, so that the log stays finite (improved DDPM).
        """
        if variance == "fixed_small":
            return self.posterior_log_variance_clipped
        if variance == "fixed_large":
            large = jnp.concatenate([self.posterior_variance[1:2], self.betas[1:]])
            return jnp.log(large)
        raise ValueError(f"variance={variance!r} is learned, not fixed.")


def beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The float64 betas of a named schedule with ``num_steps`` steps, each clipped at 0.999.

    The clip matters only for the linear schedule with T < 20, where 1000 / T scaling would
    push beta above 1.
    """
    if name == "linear":
        scale = 1000.0 / num_steps
        return np.minimum(
            np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64), 0.999
        )
    if name == "cosine":
        s = 0.008

        def alpha_bar(t: np.ndarray) -> np.ndarray:
            return np.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

        t = np.arange(num_steps, dtype=np.float64)
        return np.minimum(1.0 - alpha_bar(t + 1) / alpha_bar(t), 0.999)
    raise ValueError(f"schedule={name!r} is not allowed; choose 'linear' or 'cosine'.")


def space_timesteps(num_steps: int, count: int) -> np.ndarray:
    """``count`` timesteps spread evenly over ``[0, num_steps - 1]``, both ends kept."""
    if not 1 <= count <= num_steps:
        raise ValueError(
            f"count={count} sampling steps is not allowed with {num_steps} training steps; "
            f"choose 1 <= count <= {num_steps}."
        )
    if count == 1:
        return np.array([num_steps - 1])
    stride = (num_steps - 1) / (count - 1)
    return np.round(np.arange(count) * stride).astype(np.int64)


def schedule_from_betas(betas: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
    """Derive every schedule quantity from ``betas`` in float64, then store them as float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must be a 1-d array with every value in (0, 1).")
    n = betas.shape[0]
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if n > 1 else betas
    arrays = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
        * np.sqrt(1.0 - betas)
        / (1.0 - alphas_cumprod),
    )
    return Schedule(
        **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()},
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
    )


def make_schedule(name: str, num_steps: int, *, sampling_steps: int | None = None) -> Schedule:
    """The schedule ``name`` with ``num_steps`` training steps.

    **Arguments:**
    - `name`: `"linear"` or `"cosine"`.
    - `num_steps`: the number of training steps T.
    - `sampling_steps`: if given, respace to this many steps for sampling; the kept timesteps
      are in `Schedule.timesteps`, and alpha_bar on them equals the training schedule's.

    **Returns:** a `Schedule` PyTree.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps!r} is not allowed; it must be an integer >= 2.")
    betas = beta_schedule(name, num_steps)
    if sampling_steps is None or sampling_steps == num_steps:
        return schedule_from_betas(betas)
    kept = space_timesteps(num_steps, sampling_steps)
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    respaced = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return schedule_from_betas(respaced, kept)


def log_sigma(schedule: Schedule) -> Float[Array, " n"]:
    """log of sigma_t = sqrt((1 - abar_t) / abar_t), the noise-to-signal ratio of each step."""
    return 0.5 * (jnp.log1p(-schedule.alphas_cumprod) - jnp.log(schedule.alphas_cumprod))


def continuous_timestep(schedule: Schedule, log_sig: Float[Array, ""]) -> Float[Array, ""]:
    """The fractional training timestep whose noise level is ``exp(log_sig)``.

    Piecewise linear in log sigma between the schedule's steps, clamped to its ends; the exact
    inverse of `continuous_alpha_bar` on that range.
    """
    return jnp.interp(log_sig, log_sigma(schedule), schedule.timesteps.astype(log_sig.dtype))


def continuous_alpha_bar(schedule: Schedule, t: Float[Array, ""]) -> Float[Array, ""]:
    """alpha_bar at a fractional training timestep, interpolating log sigma linearly in t."""
    log_sig = jnp.interp(t, schedule.timesteps.astype(t.dtype), log_sigma(schedule))
    return jax.nn.sigmoid(-2.0 * log_sig)
