"""The few-shot diffusion model: set encoder, optional Gaussian posterior and denoiser.

Training sees sets of ``ns`` images of one class. Each image ``x_i`` is denoised conditioned on
the context of the other images, ``c_i = Enc(X \\ {x_i})`` (leave-one-out), so the model learns
to generate a new member of a set from the rest. All ``ns`` contexts come from one vectorised
pass: the ``ns`` subsets are gathered into one array and the encoder is vmapped over them.

With a variational context (VFSDDPM) the encoder output is mapped to a Gaussian posterior
q(c_i | X \\ {x_i}), ``c_i`` is sampled by reparameterisation and the KL to N(0, I) is added to the
loss. Every leave-one-out context adds its own KL: the loss is
``mean_i [L_diffusion(x_i | c_i) + KL_i]``, with ``KL_i`` the mean per-dimension KL in bits
(`klc`). The reference code adds only the KL of the last context it computed, once per set,
then divides the set's loss by ``ns``, so its KL weight is ``1 / ns`` of this one. At sampling
time the posterior mean is the context.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .. import diffusion
from ..config import DiffusionConfig, ModelConfig
from ..diffusion import Schedule
from .denoiser import AbstractDenoiser, maybe_checkpoint, weights_dtype
from .dit import DiT
from .encoder import AbstractEncoder, Context
from .layers import split_key
from .posterior import GaussianPosterior, gaussian_kl, reparameterize
from .unet import UNet, UNetSetEncoder
from .vit import ImageTokenEncoder, SetTokenEncoder


class SetContext(NamedTuple):
    """A context and, for a variational model, the posterior it was drawn from."""

    c: Array
    """The context the denoiser sees: `(hdim,)` or tokens `(n, hdim)`, with a leading `ns` axis
    for leave-one-out contexts."""
    mu: Array | None
    """The posterior mean (None for a deterministic context)."""
    logvar: Array | None
    """The posterior log-variance (None for a deterministic context)."""


def leave_one_out_indices(ns: int) -> np.ndarray:
    """Row ``i`` lists the indices of the set without ``i``: an ``(ns, ns - 1)`` integer array."""
    cols = np.arange(ns - 1)[None, :]
    return cols + (cols >= np.arange(ns)[:, None])


def build_encoder(config: ModelConfig, *, key: PRNGKeyArray) -> AbstractEncoder:
    """The set encoder `config` describes."""
    if config.encoder == "unet":
        return UNetSetEncoder(
            image_size=config.image_size,
            channels=config.channels,
            model_channels=config.unet_model_channels,
            channel_mult=config.unet_channel_mult,
            num_res_blocks=config.unet_num_res_blocks,
            attention_resolutions=config.unet_attention_resolutions,
            head_channels=config.encoder_head_dim,
            hdim=config.hdim,
            dropout=config.encoder_dropout,
            key=key,
        )
    if config.encoder == "vit":
        encoder = ImageTokenEncoder
    else:
        encoder = functools.partial(SetTokenEncoder, set_size=config.ns - 1)
    return encoder(
        image_size=config.image_size,
        channels=config.channels,
        patch_size=config.encoder_patch_size,
        dim=config.hdim,
        depth=config.encoder_depth,
        num_heads=config.encoder_heads,
        head_dim=config.encoder_head_dim,
        mlp_dim=config.encoder_mlp_dim,
        hdim=config.hdim,
        pooling=config.pooling,
        dropout=config.encoder_dropout,
        time_token=config.encoder_time_token,
        key=key,
    )


def null_context_shape(config: ModelConfig) -> tuple[int, ...]:
    """The shape of the learned null context of classifier-free guidance.

    The shape of the contexts, except for `none` pooling, whose number of tokens depends on the
    set size: its null context is one token, which the loss broadcasts to the contexts' tokens
    (cross-attention to copies of one token is attention to that token) and the sampler gives
    the denoiser as it is.
    """
    patches = (config.image_size // config.encoder_patch_size) ** 2
    special = 2 if config.encoder_time_token else 1
    shapes: dict[str, tuple[int, ...]] = {
        "mean_patch": (patches, config.hdim),
        "agg": (special + patches, config.hdim),
        "none": (1, config.hdim),
    }
    return shapes.get(config.pooling, (config.hdim,))


def build_denoiser(config: ModelConfig, *, key: PRNGKeyArray) -> AbstractDenoiser:
    """The denoiser (DiT or UNet) `config` describes, conditioned on contexts of size `hdim`."""
    if config.denoiser == "dit":
        hidden, depth, heads = config.dit_dims
        return DiT(
            image_size=config.image_size,
            in_channels=config.channels,
            out_channels=config.out_channels,
            patch_size=config.dit_patch_size,
            hidden=hidden,
            depth=depth,
            num_heads=heads,
            context_dim=config.hdim,
            conditioning=config.conditioning,
            gate_bias=config.dit_gate_bias,
            remat=config.remat,
            key=key,
        )
    return UNet(
        in_channels=config.channels,
        model_channels=config.unet_model_channels,
        out_channels=config.out_channels,
        num_res_blocks=config.unet_num_res_blocks,
        attention_resolutions=config.unet_attention_resolutions,
        channel_mult=config.unet_channel_mult,
        num_heads=config.unet_num_heads,
        dropout=config.unet_dropout,
        context_dim=config.hdim,
        conditioning=config.conditioning,
        image_size=config.image_size,
        remat=config.remat,
        key=key,
    )


class FSDM(eqx.Module):
    """Few-shot diffusion model: ``encoder`` -> optional ``posterior`` -> ``denoiser``."""

    encoder: AbstractEncoder
    posterior: GaussianPosterior | None
    denoiser: AbstractDenoiser
    null_context: Array | None
    image_shape: tuple[int, int, int] = eqx.field(static=True)
    null_context_prob: float = eqx.field(static=True)
    ns: int = eqx.field(static=True)
    time_token: bool = eqx.field(static=True)
    learned_variance: bool = eqx.field(static=True)
    remat: bool = eqx.field(static=True)
    inference: bool
    """Evaluation mode, set by `eqx.nn.inference_mode`: no dropout, posterior means and no
    null-context dropping wherever a method's `inference` argument is left as None."""

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        """**Arguments:**
        - `config`: the networks' configuration.
        - `key`: initialisation randomness.
        """
        enc_key, post_key, den_key = jax.random.split(key, 3)
        self.encoder = build_encoder(config, key=enc_key)
        self.posterior = (
            GaussianPosterior(config.hdim, key=post_key) if config.variational else None
        )
        self.denoiser = build_denoiser(config, key=den_key)
        self.null_context = (
            jnp.zeros(null_context_shape(config)) if config.null_context_prob > 0 else None
        )
        self.null_context_prob = config.null_context_prob
        self.inference = False
        self.image_shape = (config.channels, config.image_size, config.image_size)
        self.ns = config.ns
        self.time_token = config.encoder_time_token
        self.learned_variance = config.learned_variance
        self.remat = config.remat

    def _inference(self, inference: bool | None) -> bool:
        """An explicit `inference` argument, else the mode `eqx.nn.inference_mode` set."""
        return self.inference if inference is None else inference

    def _check_images(self, x: Array, what: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{what} must have shape (n, c, h, w) with (c, h, w) = {self.image_shape}, got "
                f"{tuple(x.shape)}; pass images channels first at the configured size."
            )

    def _check_diffusion(self, config: DiffusionConfig) -> None:
        if config.learned_variance != self.learned_variance:
            raise ValueError(
                f"DiffusionConfig.variance={config.variance!r} does not fit a model built with "
                f"ModelConfig.learned_variance={self.learned_variance}; use variance="
                f"{'learned_range' if self.learned_variance else 'fixed_small or fixed_large'!r} "
                "or rebuild the model."
            )

    def context(
        self,
        x_set: Float[Array, "m c h w"],
        t: Float[Array, ""] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> SetContext:
        """The context of one set (any number of images).

        **Arguments:**
        - `x_set`: the images, channels first.
        - `t`: the diffusion timestep, when the encoder has a timestep token.
        - `key`: dropout and posterior-sampling randomness; needed unless `inference`.
        - `inference`: no dropout, and the posterior mean instead of a sample; None: the
          model's mode (`eqx.nn.inference_mode`).

        **Returns:** the context, with the posterior's mean and log-variance when variational,
        in the dtype of `x_set` (the networks compute in the dtype of their weights).

        With `ModelConfig.remat` the encoder's activations are recomputed in the backward pass.
        """
        inference = self._inference(inference)
        enc_key, post_key = split_key(key, 2)

        def encode(
            encoder: AbstractEncoder,
            x: Float[Array, "m c h w"],
            t: Float[Array, ""] | None,
            k: PRNGKeyArray | None,
        ) -> Context:
            return encoder(x, t, key=k, inference=inference)

        dtype = weights_dtype(self.encoder)
        x_in = x_set.astype(dtype)
        t_in = None if t is None else t.astype(dtype)
        h = maybe_checkpoint(encode, self.remat)(self.encoder, x_in, t_in, enc_key)
        if self.posterior is None:
            return SetContext(h.astype(x_set.dtype), None, None)
        h = h.astype(weights_dtype(self.posterior))
        mu, logvar = self.posterior(h) if h.ndim == 1 else jax.vmap(self.posterior)(h)
        mu, logvar = mu.astype(x_set.dtype), logvar.astype(x_set.dtype)
        if inference:
            return SetContext(mu, mu, logvar)
        if post_key is None:
            raise ValueError("a variational context is sampled in training: pass a key.")
        return SetContext(reparameterize(mu, logvar, key=post_key), mu, logvar)

    def leave_one_out_context(
        self,
        x_set: Float[Array, "ns c h w"],
        t: Float[Array, " ns"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> SetContext:
        """The ``ns`` contexts ``c_i = Enc(X \\ {x_i})`` of a set, in one vectorised pass.

        **Arguments:**
        - `x_set`: the set, `ns >= 2` images, channels first.
        - `t`: per-image diffusion timesteps for an encoder with a timestep token (context `i`
          sees `t[i]`, the timestep of the image it conditions); None otherwise.
        - `key`: dropout and posterior-sampling randomness; needed unless `inference`.
        - `inference`: no dropout, and posterior means instead of samples; None: the model's
          mode.

        **Returns:** the contexts (and posterior parameters), each with a leading `ns` axis.
        """
        self._check_images(x_set, "x_set")
        inference = self._inference(inference)
        ns = x_set.shape[0]
        if ns < 2:
            raise ValueError(f"a leave-one-out context needs a set of at least 2 images, got {ns}.")
        subsets = x_set[leave_one_out_indices(ns)]
        keys = None if key is None else jax.random.split(key, ns)

        def one(
            subset: Float[Array, "m c h w"], ti: Float[Array, ""] | None, k: PRNGKeyArray | None
        ) -> SetContext:
            return self.context(subset, ti, key=k, inference=inference)

        return jax.vmap(one)(subsets, t, keys)

    def loss(
        self,
        x_set: Float[Array, "ns c h w"],
        *,
        key: PRNGKeyArray,
        diffusion_config: DiffusionConfig,
        schedule: Schedule,
        inference: bool | None = None,
        context_offset: Float[Array, "ns ..."] | None = None,
    ) -> dict[str, Array]:
        """The training loss of one set (vmap over sets outside).

        Each image draws its own timestep and noise and is denoised given its leave-one-out
        context. The diffusion terms and the KL are computed in the dtype of `x_set` (float32),
        whatever the dtype of the weights.

        **Arguments:**
        - `x_set`: the set, `ModelConfig.ns` images in [-1, 1], channels first.
        - `key`: timesteps, noise, dropout and posterior samples.
        - `diffusion_config`: the loss and variance settings.
        - `schedule`: the training schedule.
        - `inference`: no dropout, posterior means and no null-context dropping (for
          evaluation); None: the model's mode (`eqx.nn.inference_mode`).
        - `context_offset`: added to the leave-one-out contexts before the denoiser sees them;
          the gradient of the loss with respect to a zero offset is its gradient with respect
          to the contexts, in the same backward pass as the parameters'.

        **Returns:** scalars `loss` (`mean_i(diffusion loss_i + klc_i)`), `mse`, `vb` (bits per
        dimension of the sampled L_t), `klc` (mean KL of the contexts to N(0, I), bits per
        dimension; 0 when deterministic), and the arrays `context` (`(ns, ...)`, as the
        denoiser sees it), `timesteps` (`(ns,)`, each image's diffusion timestep), plus
        `context_mu` and `context_logvar` when variational.
        """
        self._check_diffusion(diffusion_config)
        self._check_images(x_set, "x_set")
        inference = self._inference(inference)
        ns = x_set.shape[0]
        if ns != self.ns:
            raise ValueError(
                f"the model was configured for training sets of ModelConfig.ns={self.ns} images, "
                f"got {ns}; make DataConfig.ns and ModelConfig.ns agree."
            )
        t_key, ctx_key, noise_key, drop_key, null_key = jax.random.split(key, 5)
        t = jax.random.randint(t_key, (ns,), 0, schedule.num_steps)
        timesteps = schedule.timesteps[t].astype(x_set.dtype)
        t_model = timesteps if self.time_token else None
        ctx = self.leave_one_out_context(x_set, t_model, key=ctx_key, inference=inference)
        contexts = ctx.c
        if context_offset is not None:
            if context_offset.shape != contexts.shape:
                raise ValueError(
                    f"context_offset has shape {context_offset.shape}; it must have the shape "
                    f"of the leave-one-out contexts, {contexts.shape}."
                )
            contexts = contexts + context_offset.astype(contexts.dtype)
        if self.null_context is not None and not inference:
            dropped = jax.random.bernoulli(null_key, self.null_context_prob, (ns,))
            null = jnp.broadcast_to(self.null_context.astype(contexts.dtype), contexts.shape)
            mask = dropped.reshape(ns, *([1] * (contexts.ndim - 1)))
            contexts = jnp.where(mask, null, contexts)

        def one(
            x: Float[Array, "c h w"],
            c: Context,
            ti: Array,
            k_noise: PRNGKeyArray,
            k_drop: PRNGKeyArray,
        ) -> dict[str, Float[Array, ""]]:
            def model_fn(x_t: Float[Array, "c h w"], tt: Float[Array, ""]) -> Array:
                return self.denoiser(x_t, tt, c, key=k_drop, inference=inference).astype(x.dtype)

            return diffusion.training_losses(
                model_fn, schedule, x, key=k_noise, config=diffusion_config, t=ti
            )

        losses = jax.vmap(one)(
            x_set, contexts, t, jax.random.split(noise_key, ns), jax.random.split(drop_key, ns)
        )
        metrics: dict[str, Array] = {
            "mse": jnp.mean(losses["mse"]),
            "vb": jnp.mean(losses["vb"]),
            "context": contexts,
            "timesteps": timesteps,
        }
        if ctx.mu is not None and ctx.logvar is not None:
            zeros = jnp.zeros_like(ctx.mu)
            kl = gaussian_kl(ctx.mu, ctx.logvar, zeros, zeros)
            klc = jnp.mean(kl.reshape(ns, -1), axis=1) / math.log(2.0)
            metrics["context_mu"] = ctx.mu
            metrics["context_logvar"] = ctx.logvar
        else:
            klc = jnp.zeros((ns,), x_set.dtype)
        metrics["klc"] = jnp.mean(klc)
        metrics["loss"] = jnp.mean(losses["loss"] + klc)
        return metrics

    def sample(
        self,
        support: Float[Array, "m c h w"],
        num: int,
        *,
        key: PRNGKeyArray,
        diffusion_config: DiffusionConfig,
        guidance_scale: float | None = None,
    ) -> Float[Array, "num c h w"]:
        """Generate ``num`` new images of the class of ``support``.

        The context is the support set's (posterior mean, no dropout); with a timestep token it is
        recomputed at every step of the sampler.

        **Arguments:**
        - `support`: the conditioning set, images in [-1, 1], channels first.
        - `num`: how many images to generate.
        - `key`: the starting noise and the sampler's randomness.
        - `diffusion_config`: the sampler, its steps and the variance.
        - `guidance_scale`: classifier-free guidance ``w`` (default
          `diffusion_config.guidance_scale`): every sampler sees
          ``eps_null + w (eps_c - eps_null)``, the variance channels from the conditional
          prediction; 1 is plain conditional sampling.

        **Returns:** the images, channels first.
        """
        self._check_diffusion(diffusion_config)
        self._check_images(support, "support")
        noise_key, sample_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, (num, *self.image_shape), support.dtype)
        fixed = None if self.time_token else self.context(support, inference=True).c

        w = diffusion_config.guidance_scale if guidance_scale is None else guidance_scale
        if w < 0:
            raise ValueError(f"guidance_scale={w!r} is not allowed; it must be >= 0.")
        null = self.null_context
        if w != 1.0 and null is None:
            raise ValueError(
                f"guidance_scale={w!r} needs a null context, but this model was trained without "
                "one (ModelConfig.null_context_prob=0); sample with guidance_scale=1."
            )

        def model_fn(x_t: Float[Array, "c h w"], t: Float[Array, ""]) -> Array:
            c = self.context(support, t, inference=True).c if fixed is None else fixed
            out = self.denoiser(x_t, t, c, inference=True).astype(x_t.dtype)
            if w == 1.0 or null is None:
                return out
            out_null = self.denoiser(x_t, t, null.astype(c.dtype), inference=True)
            eps_c, eps_null = out[: x_t.shape[0]], out_null[: x_t.shape[0]].astype(x_t.dtype)
            eps = eps_null + w * (eps_c - eps_null)
            return jnp.concatenate([eps, out[x_t.shape[0] :]])

        def one(x: Float[Array, "c h w"], k: PRNGKeyArray) -> Float[Array, "c h w"]:
            return diffusion.sample(model_fn, x, key=k, config=diffusion_config)

        return jax.vmap(one)(x_T, jax.random.split(sample_key, num))


def count_parameters(model: eqx.Module) -> dict[str, int]:
    """Trainable parameters (floating-point array entries) in each top-level field of ``model``.

    For an `FSDM`: ``{"encoder": ..., "posterior": ..., "denoiser": ..., "null_context": ...}``
    (0 for a missing posterior or null context). Fixed buffers computed on the fly (DiT's sin-cos
    positions) are not parameters. Works on the output of `eqx.filter_eval_shape` too, so a large
    model can be counted without allocating it.

    **Arguments:**
    - `model`: any Equinox module, or its abstract shapes.

    **Returns:** the count per field that holds modules or arrays, in declaration order.
    """
    counts: dict[str, int] = {}
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        if field.metadata.get("static", False) or isinstance(value, bool | int | float):
            continue  # hyperparameters and mode flags (`inference`)
        leaves = jax.tree.leaves(value)
        counts[field.name] = sum(math.prod(leaf.shape) for leaf in leaves if _is_parameter(leaf))
    return counts


def _is_parameter(leaf: object) -> bool:
    if not isinstance(leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        return False
    return bool(jnp.issubdtype(leaf.dtype, jnp.inexact))
