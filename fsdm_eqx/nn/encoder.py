"""The set-encoder interface: a set of images in, one context out.

Two families implement it: the transformers of `vit` (the set ViT and the sViT, which read the
whole set as one token sequence) and the image-level `UNetSetEncoder` of `unet` (each image encoded
alone, the vectors averaged over the set). `FSDM` only needs this interface; the
instrumentation of attention maps reads the transformers' `AbstractSetEncoder.trace`.
"""

import abc

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

Context = Float[Array, " hdim"] | Float[Array, "tokens hdim"]
"""An encoder's output: one vector (FiLM) or a sequence of tokens (LAG)."""


class AbstractEncoder(eqx.Module):
    """An encoder of a set of images (any number, channels first) into one context."""

    @abc.abstractmethod
    def __call__(
        self,
        x_set: Float[Array, "m c h w"],
        t: Float[Array, ""] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Context:
        """Encode a set into its context.

        **Arguments:**
        - `x_set`: the set, channels first.
        - `t`: the diffusion timestep, for an encoder with a timestep token; otherwise None.
        - `key`: dropout randomness; needed unless `inference` is true or dropout is zero.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the context: a vector `(hdim,)`, or tokens `(n, hdim)`.
        """
