"""The one interface every denoiser implements (DiT, UNet)."""

import abc

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray


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
        inference: bool = False,
    ) -> Float[Array, "c_out h w"]:
        """Predict from the noisy image ``x_t`` at (possibly fractional) timestep ``t``.

        **Arguments:**
        - `x_t`: the noisy image, channels first.
        - `t`: the diffusion timestep in [0, T), as a float (the ODE sampler uses fractional t).
        - `context`: the conditioning vector or tokens.
        - `key`: dropout randomness; needed unless `inference` is true or dropout is zero.
        - `inference`: disables dropout.

        **Returns:** the prediction, channels first.
        """
