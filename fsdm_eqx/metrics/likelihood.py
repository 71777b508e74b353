"""Bits per dimension from the variational bound, for images of unseen (or seen) classes.

The negative log-likelihood of an 8-bit image is bounded by
``L = L_prior + sum_{t>0} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) + L_0``, with one draw of
``x_t`` per step, all in bits per dimension (improved DDPM's ``calc_bpd_loop``). The bound is
taken over all training steps, or over a respaced subset: the respaced chain is itself a
diffusion with its own betas and the model is called at the kept training timesteps, so it is
still an upper bound on the NLL (a looser one).

Few-shot (the reference code's ``eval.py``): the images of each set are scored with the model
conditioned on a context set of the same class. Here each image of a set of ``ns`` is scored
under the leave-one-out context of the other ``ns - 1``, the context the model was trained with.
The reference instead conditions on 5 images of a set of 6 and scores the 6th; ``ns = 6`` gives
that same 5-image context, averaged over all six choices of the held-out image. As in the
reference, the predicted x_0 is clipped to [-1, 1] when the diffusion config clips it.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, Key, PRNGKeyArray, UInt8

from ..batching import index_keys, map_in_batches
from ..config import DiffusionConfig, EvalConfig, VarianceType
from ..data.pixels import to_float
from ..diffusion import (
    ModelFn,
    Schedule,
    make_schedule,
    prior_bpd,
    q_sample,
    split_model_output,
    vlb_terms_bpd,
)
from .fewshot import distro_label, draw_support_sets

__all__ = [
    "LikelihoodResult",
    "bits_per_dim",
    "fewshot_likelihood",
    "set_bits_per_dim",
    "vlb_bpd_terms",
]

ConditionFn = Callable[[Float[Array, "m c h w"]], ModelFn]
"""Maps a context set to the model function of one example conditioned on it."""


def _step_terms(
    model_fn: ModelFn,
    schedule: Schedule,
    x_start: Float[Array, "c h w"],
    t: Integer[Array, ""],
    noise: Float[Array, "c h w"],
    *,
    variance: VarianceType,
    clip_denoised: bool,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    x_t = q_sample(schedule, x_start, t, noise)
    output = model_fn(x_t, schedule.timesteps[t].astype(x_t.dtype))
    eps, _ = split_model_output(output, x_t, variance=variance)
    mse = jnp.mean((eps - noise) ** 2)
    vb = vlb_terms_bpd(
        output, schedule, x_start, x_t, t, variance=variance, clip_denoised=clip_denoised
    )
    return vb, mse


def vlb_bpd_terms(
    model_fn: ModelFn,
    schedule: Schedule,
    x_start: Float[Array, "c h w"],
    noise: Float[Array, "n c h w"],
    *,
    variance: VarianceType,
    clip_denoised: bool = True,
    steps_per_batch: int | None = None,
) -> dict[str, Array]:
    """Every term of the bound for one image, with the given noise for each step.

    **Arguments:**
    - `model_fn`: the denoiser of this image, ``(x_t, t) -> eps`` or ``[eps, v]``.
    - `schedule`: the full or respaced schedule; its ``n`` steps are the terms of the bound.
    - `x_start`: the image in [-1, 1] on the 8-bit grid (``u8 / 127.5 - 1``).
    - `noise`: the standard normal noise of ``x_t`` at each step.
    - `variance`: the reverse-process variance (`DiffusionConfig.variance`).
    - `clip_denoised`: clip the predicted x_0 to [-1, 1] (the reference's default).
    - `steps_per_batch`: steps evaluated together (`jax.lax.map` batch size); None for one.

    **Returns:** ``vb`` (n,): L_t in bits/dim, L_0 the decoder NLL; ``mse`` (n,): epsilon MSE;
    ``prior_bpd``; ``total_bpd`` = sum(vb) + prior_bpd.
    """
    n = schedule.num_steps
    if noise.shape[0] != n:
        raise ValueError(f"noise has {noise.shape[0]} steps; the schedule has {n}.")

    def term(args: tuple[Array, Array]) -> tuple[Array, Array]:
        t, eps = args
        return _step_terms(
            model_fn,
            schedule,
            x_start,
            t,
            eps,
            variance=variance,
            clip_denoised=clip_denoised,
        )

    vb, mse = jax.lax.map(term, (jnp.arange(n), noise), batch_size=steps_per_batch)
    prior = prior_bpd(schedule, x_start)
    return {"vb": vb, "mse": mse, "prior_bpd": prior, "total_bpd": jnp.sum(vb) + prior}


def bits_per_dim(
    model_fn: ModelFn,
    schedule: Schedule,
    x_start: Float[Array, "c h w"],
    *,
    key: PRNGKeyArray,
    variance: VarianceType,
    clip_denoised: bool = True,
    steps_per_batch: int | None = None,
) -> dict[str, Array]:
    """`vlb_bpd_terms` with the noise of every step drawn from ``key``.

    **Returns:** as `vlb_bpd_terms`.
    """
    noise = jax.random.normal(key, (schedule.num_steps, *x_start.shape), x_start.dtype)
    return vlb_bpd_terms(
        model_fn,
        schedule,
        x_start,
        noise,
        variance=variance,
        clip_denoised=clip_denoised,
        steps_per_batch=steps_per_batch,
    )


def set_bits_per_dim(
    condition: ConditionFn,
    schedule: Schedule,
    x_set: Float[Array, "ns c h w"],
    noise: Float[Array, "ns n c h w"],
    *,
    variance: VarianceType,
    clip_denoised: bool = True,
    steps_per_batch: int | None = None,
) -> dict[str, Array]:
    """The bound of every image of a set under its leave-one-out context.

    Image ``i`` is scored by ``condition(x_set without x_i)``; the context is computed once per
    image, outside the loop over steps.

    **Arguments:**
    - `condition`: a context set ``(ns - 1, c, h, w)`` -> the model function conditioned on it.
    - `schedule`, `variance`, `clip_denoised`, `steps_per_batch`: as `vlb_bpd_terms`.
    - `x_set`: the set, in [-1, 1].
    - `noise`: the noise of every step for every image.

    **Returns:** as `vlb_bpd_terms`, each with a leading axis of size ``ns``.
    """
    ns = x_set.shape[0]
    if ns < 2:
        raise ValueError(f"a leave-one-out context needs sets of at least 2 images; got {ns}.")
    others = np.array([[j for j in range(ns) if j != i] for i in range(ns)])

    def one(i: Array, eps: Array) -> dict[str, Array]:
        context = x_set[jnp.asarray(others)[i]]
        return vlb_bpd_terms(
            condition(context),
            schedule,
            x_set[i],
            eps,
            variance=variance,
            clip_denoised=clip_denoised,
            steps_per_batch=steps_per_batch,
        )

    return jax.vmap(one)(jnp.arange(ns), noise)


@functools.partial(
    jax.jit, static_argnames=("condition", "variance", "clip_denoised", "steps_per_batch")
)
def _score_sets(
    condition: ConditionFn,
    schedule: Schedule,
    x_sets: Float[Array, "b ns c h w"],
    keys: Key[Array, " b"],
    *,
    variance: VarianceType,
    clip_denoised: bool,
    steps_per_batch: int | None,
) -> dict[str, Array]:
    """`set_bits_per_dim` over a batch of sets, the noise of each set drawn from its key."""

    def one(x_set: Array, key: Array) -> dict[str, Array]:
        shape = (x_set.shape[0], schedule.num_steps, *x_set.shape[1:])
        noise = jax.random.normal(key, shape, x_set.dtype)
        return set_bits_per_dim(
            condition,
            schedule,
            x_set,
            noise,
            variance=variance,
            clip_denoised=clip_denoised,
            steps_per_batch=steps_per_batch,
        )

    return jax.vmap(one)(x_sets, keys)


@dataclasses.dataclass(frozen=True)
class LikelihoodResult:
    """Bits per dimension of the images of many sets, each under its leave-one-out context."""

    bpd: float
    """Mean over images of the bound, bits per dimension."""
    bpd_sem: float
    """Standard error of that mean."""
    prior_bpd: float
    """Mean prior term."""
    decoder_bpd: float
    """Mean decoder term L_0."""
    vb_per_step: list[float]
    """Mean L_t of each step of the (possibly respaced) schedule."""
    mse_per_step: list[float]
    """Mean epsilon MSE of each step."""
    distro: str
    """``"in-distro"`` (training classes) or ``"out-distro"`` (unseen classes)."""
    classes: tuple[int, ...]
    num_sets: int
    ns: int
    num_images: int
    num_steps: int
    """Steps of the bound (T, or the respaced count)."""
    training_steps: int
    seed: int
    clip_denoised: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes)
        return out

    def to_json(self) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def fewshot_likelihood(
    condition: ConditionFn,
    images: UInt8[np.ndarray, "n c h w"],
    labels: Integer[np.ndarray, " n"],
    *,
    diffusion: DiffusionConfig,
    config: EvalConfig | None = None,
    classes: Sequence[int] | None = None,
    seen_in_training: bool,
    steps_per_batch: int | None = None,
) -> LikelihoodResult:
    """Bits per dimension of real images of the given classes under leave-one-out contexts.

    ``config.likelihood_sets`` random sets of ``config.ns`` images (`draw_support_sets`, seed
    ``config.seed``) are scored with `set_bits_per_dim`, ``config.likelihood_batch_size`` sets
    per jitted call, over all ``diffusion.num_steps`` steps or ``config.likelihood_steps``
    respaced ones.

    **Arguments:**
    - `condition`: a context set ``(ns - 1, c, h, w)`` in [-1, 1] -> the model function
      ``(x_t, t) -> output`` conditioned on it; for the FSDM model (EMA weights),
      ``c = model.context(s, inference=True).c`` and
      ``lambda x_t, t: model.denoiser(x_t, t, c, inference=True)``, with the context computed
      inside the lambda from ``t`` when the encoder has a timestep token. An unconditional
      model ignores the set.
    - `images`, `labels`: the real images (uint8, channel-first) and their classes.
    - `diffusion`: the schedule, variance and clipping of the trained model.
    - `config`: set counts, steps, seed and batch size; default `EvalConfig()`.
    - `classes`: the classes to score (default: every label present).
    - `seen_in_training`: whether the scored classes are training classes; recorded as
      ``distro``, ``"in-distro"`` when they are, ``"out-distro"`` when they are unseen.
    - `steps_per_batch`: steps evaluated together inside the loop over steps.

    **Returns:** a `LikelihoodResult`.
    """
    config = EvalConfig() if config is None else config
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 of shape (n, c, h, w); got {images.dtype} {images.shape}."
        )
    chosen = tuple(int(c) for c in (np.unique(labels) if classes is None else classes))
    schedule = make_schedule(
        diffusion.schedule, diffusion.num_steps, sampling_steps=config.likelihood_steps
    )
    sets = draw_support_sets(
        labels, chosen, num_sets=config.likelihood_sets, ns=config.ns, seed=config.seed
    )
    x = to_float(images[sets.indices])
    n, ns = schedule.num_steps, config.ns

    def score(x_sets: Float[Array, "b ns c h w"], ids: Integer[Array, " b"]) -> dict[str, Array]:
        return _score_sets(
            condition,
            schedule,
            x_sets,
            index_keys(config.seed, ids),
            variance=diffusion.variance,
            clip_denoised=diffusion.clip_denoised,
            steps_per_batch=steps_per_batch,
        )

    ids = np.arange(x.shape[0], dtype=np.int32)
    terms = map_in_batches(score, (x, ids), config.likelihood_batch_size)
    total = np.asarray(terms["total_bpd"], np.float64).reshape(-1)
    vb = np.asarray(terms["vb"], np.float64).reshape(-1, n)
    mse = np.asarray(terms["mse"], np.float64).reshape(-1, n)
    prior = np.asarray(terms["prior_bpd"], np.float64).reshape(-1)
    if not np.all(np.isfinite(total)):
        raise ValueError(
            "the bound is not finite for some images; check that the model's output is finite "
            "and that the images are uint8 in [0, 255]."
        )
    return LikelihoodResult(
        bpd=float(total.mean()),
        bpd_sem=float(total.std(ddof=1) / math.sqrt(total.size)) if total.size > 1 else 0.0,
        prior_bpd=float(prior.mean()),
        decoder_bpd=float(vb[:, 0].mean()),
        vb_per_step=[float(v) for v in vb.mean(axis=0)],
        mse_per_step=[float(v) for v in mse.mean(axis=0)],
        distro=distro_label(seen_in_training),
        classes=chosen,
        num_sets=config.likelihood_sets,
        ns=ns,
        num_images=int(total.size),
        num_steps=n,
        training_steps=diffusion.num_steps,
        seed=config.seed,
        clip_denoised=diffusion.clip_denoised,
    )
