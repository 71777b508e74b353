"""The one interface every denoiser implements (DiT, UNet)."""

import abc
from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

_T = TypeVar("_T")


class AbstractDenoiser(eqx.Module):
    """A conditional denoiser for one image: ``(x_t, t, context) -> prediction``.

    The prediction has ``out_channels`` channels: epsilon, followed by the variance interpolation
    channels when the diffusion learns its variance. ``context`` is one vector (FiLM / adaLN
    conditioning) or a set of tokens (cross-attention, LAG), as the concrete denoiser declares.
    Training, sampling and logging see only this interface.
    """

    @abc.abstractmethod
    def __call__(
        self,
        x_t: Float[Array, "c h w"],
        t: Float[Array, ""],
        context: Float[Array, " d"] | Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "c_out h w"]:
        """Predict from the noisy image ``x_t`` at (possibly fractional) timestep ``t``.

        **Arguments:**
        - `x_t`: the noisy image, channels first.
        - `t`: the diffusion timestep in [0, T), as a float (the ODE sampler uses fractional t).
        - `context`: the conditioning vector or tokens.
        - `key`: dropout randomness; needed unless `inference` is true or dropout is zero.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the prediction, channels first.
        """

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype of the weights, in which the network computes (bfloat16 under mixed
        precision); inputs are cast to it."""
        return weights_dtype(self)

    @abc.abstractmethod
    def modulation(
        self, t: Float[Array, ""], context: Float[Array, " d"] | Float[Array, "n d"]
    ) -> dict[str, Float[Array, ""]]:
        """The RMS of every conditioning vector the denoiser applies at ``(t, context)``.

        Read from the model's own modulation layers (adaLN shift/scale/gate, FiLM scale/shift),
        as a training diagnostic: their size says how strongly each block is conditioned.

        **Arguments:**
        - `t`: the diffusion timestep.
        - `context`: the conditioning vector or tokens.

        **Returns:** `{"<block>/<part>": rms}` in float32, e.g. `"block0/gate_msa"`.
        """


def weights_dtype(module: eqx.Module) -> jnp.dtype:
    """The dtype of a module's first floating-point array: the dtype it computes in."""
    for leaf in jax.tree_util.tree_leaves(module):
        if eqx.is_inexact_array(leaf):
            return leaf.dtype
    return jnp.dtype(jnp.float32)


def rms(v: Float[Array, "*shape"]) -> Float[Array, ""]:
    """The root mean square of the entries of ``v``, in float32."""
    return jnp.sqrt(jnp.mean(jnp.square(v.astype(jnp.float32))))


def maybe_checkpoint(fn: Callable[..., _T], remat: bool) -> Callable[..., _T]:
    """``fn`` under `eqx.filter_checkpoint` when ``remat``: its activations are recomputed in
    the backward pass instead of stored, trading compute for memory."""
    return eqx.filter_checkpoint(fn) if remat else fn
