"""Set encoders: a ViT and a small-data ViT (sViT) that read a whole set of images at once.

As in the reference code of Few-Shot Diffusion Models, the set becomes one token sequence behind a
class token (and, optionally, a diffusion-timestep token), read by one set transformer. The two
encoders differ only in how they tokenise the set:

- `ImageTokenEncoder` (the set ViT) embeds every image's patches and gives each image the same
  position embeddings, so nothing marks which image a token came from: it reads sets of any size
  and is invariant to their order.
- `SetTokenEncoder` (the sViT) stacks the set on the channel axis, one token per patch position
  for the whole set.

The pooled output is the context:

- `cls`, `mean`, `sum`: one vector of size `hdim` (FiLM conditioning). `mean` and `sum` pool all
  tokens, class and timestep tokens included, as the reference does.
- `mean_patch`: one token per patch position, the mean over the token groups (LAG).
- `agg`: each patch position's embedding is averaged over the images of the set *before* the
  transformer, which reads the special tokens and one token per patch position; all its output
  tokens are the context (LAG), as many whatever the set size.
- `none`: all output tokens are the context (LAG): the special tokens and every image's patches,
  so their number grows with the set (``ns - 1`` images in training, the support set's size at
  sampling).

Differences from the reference code:
- The reference's `mean_patch` reshapes the image-major token sequence as if it were
  position-major (so it averages tokens of different positions) and runs the transformer again on
  the result; here each position is averaged over the images of the set, then the output head
  is applied.
- The reference's `agg` reshapes the concatenated per-image patch embeddings the same way (so its
  "mean" mixes different positions of different images); here each position's embedding is
  averaged over the images, the mean the pooling is meant to take.
- With `agg` and `none` the reference feeds a zero timestep token when the encoder is given no
  timestep; here an encoder without a timestep token has no such slot, so the context has one
  special token (the class token) instead of two.
- The sViT (`SetTokenEncoder`) stacks the images of the set along channels as the reference does
  (one token per patch position, so it reads sets of one size, in order), and applies the
  Shifted Patch Tokenization that the reference leaves commented out (the stack and its four
  diagonal half-patch shifts, Lee et al. 2021), with Locality Self-Attention.
- The timestep token is a linear map of the sinusoidal embedding of ``t``; the reference first
  passes it through the UNet's own time MLP. The reference feeds it in training but puts a zero
  token in its place at sampling; here the token is a switch (`time_token`), and an encoder with
  it is given ``t`` in training and sampling alike, an encoder without it has no such slot.
- Class token and position embeddings start from N(0, 0.02^2) rather than N(0, 1).
"""

import abc
from typing import NamedTuple, NotRequired, TypedDict, Unpack, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import PoolingName as Pooling
from .attention import Transformer
from .encoder import AbstractEncoder, Context
from .layers import apply_tokens, patchify, split_key, timestep_embedding

POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
"""The poolings of the set transformer, `Pooling`'s values."""


class EncoderTrace(NamedTuple):
    """A set encoder's context together with intermediates of the same forward pass."""

    context: Array
    """The pooled context: `(hdim,)`, or tokens `(n, hdim)` for `mean_patch`, `agg` and `none`."""
    attention: Array
    """The attention weights of every block, `(depth, heads, tokens, tokens)`."""
    attn_out: Array
    """The attention branch of every block, `(depth, tokens, dim)`."""
    mlp_out: Array
    """The MLP branch of every block, `(depth, tokens, dim)`."""


def shifted_patch_input(x: Float[Array, "c h w"], shift: int) -> Float[Array, "c5 h w"]:
    """The image with its four diagonal shifts by ``shift`` pixels (zero-padded), along channels.

    Shifted Patch Tokenization (Lee et al. 2021) lets each patch token see its neighbours' pixels.
    """
    _, h, w = x.shape
    padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift)))
    views = [x]
    for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        y0, x0 = shift + dy * shift, shift + dx * shift
        views.append(padded[:, y0 : y0 + h, x0 : x0 + w])
    return jnp.concatenate(views, axis=0)


class SetTransformerOptions(TypedDict):
    """The set transformer's hyperparameters, the same whichever way the set is tokenised."""

    dim: int
    """The token width."""
    depth: int
    """The number of transformer blocks."""
    num_heads: int
    """Attention heads per block."""
    head_dim: int
    """The width of each head."""
    mlp_dim: int
    """The hidden width of each block's MLP."""
    hdim: int
    """The context size."""
    pooling: NotRequired[Pooling]
    """`cls`, `mean` (the default), `sum` (a vector) or `mean_patch`, `agg`, `none` (tokens)."""
    dropout: NotRequired[float]
    """Dropout on the embeddings, attention outputs and MLPs; 0 by default."""
    time_token: NotRequired[bool]
    """Add a diffusion-timestep token (then `t` must be passed); off by default."""
    time_dim: NotRequired[int]
    """Size of the sinusoidal timestep embedding; 256 by default."""


class SetTransformer(eqx.Module):
    """The set trunk both encoders share: tokens, position embeddings, transformer, pooling, head.

    Takes the patch tokens of every image of the set and returns the pooled context.
    """

    cls_token: Float[Array, " dim"]
    position: Float[Array, "k dim"]
    time_proj: eqx.nn.Linear | None
    dropout: eqx.nn.Dropout
    transformer: Transformer
    head_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    pooling: Pooling = eqx.field(static=True)
    num_patches: int = eqx.field(static=True)
    time_dim: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        num_patches: int,
        locality: bool,
        dim: int,
        depth: int,
        num_heads: int,
        head_dim: int,
        mlp_dim: int,
        hdim: int,
        pooling: Pooling = "mean",
        dropout: float = 0.0,
        time_token: bool = False,
        time_dim: int = 256,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `num_patches`, the patch positions of an image; `locality`, Locality
        Self-Attention; `key`, initialisation randomness; the rest as `SetTransformerOptions`."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not allowed; choose one of {POOLINGS}.")
        cls_key, pos_key, time_key, tr_key, head_key = jax.random.split(key, 5)
        num_special = 2 if time_token else 1
        self.cls_token = 0.02 * jax.random.normal(cls_key, (dim,))
        self.position = 0.02 * jax.random.normal(pos_key, (num_special + num_patches, dim))
        self.time_proj = eqx.nn.Linear(time_dim, dim, key=time_key) if time_token else None
        self.dropout = eqx.nn.Dropout(dropout)
        self.transformer = Transformer(
            dim,
            depth=depth,
            num_heads=num_heads,
            head_dim=head_dim,
            mlp_dim=mlp_dim,
            dropout=dropout,
            locality=locality,
            key=tr_key,
        )
        self.head_norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, hdim, key=head_key)
        self.pooling = pooling
        self.num_patches = num_patches
        self.time_dim = time_dim

    @property
    def num_special(self) -> int:
        """The tokens before the patches: the class token, and the timestep token if any."""
        return 1 if self.time_proj is None else 2

    def trace(
        self,
        patches: Float[Array, "m p dim"],
        t: Float[Array, ""] | None,
        *,
        key: PRNGKeyArray | None,
        inference: bool | None,
    ) -> EncoderTrace:
        """Pool the set's patch tokens into the context, keeping the transformer's intermediates.

        ``patches`` holds one grid of patch tokens per token group; `agg` pooling first averages
        each patch position over the groups, so the transformer reads a single grid.
        """
        if self.pooling == "agg":
            patches = jnp.mean(patches, axis=0, keepdims=True)
        m, p, dim = patches.shape
        special = [self.cls_token[None]]
        if self.time_proj is not None:
            if t is None:
                raise ValueError(
                    "this encoder was built with a timestep token "
                    "(ModelConfig.encoder_time_token=True): pass the timestep t."
                )
            embedding = timestep_embedding(t, self.time_dim).astype(self.time_proj.weight.dtype)
            special.append(self.time_proj(embedding)[None])
        elif t is not None:
            raise ValueError(
                "this encoder has no timestep token (ModelConfig.encoder_time_token=False): "
                "pass t=None."
            )
        k = len(special)
        position = jnp.concatenate([self.position[:k], jnp.tile(self.position[k:], (m, 1))], axis=0)
        tokens = jnp.concatenate([*special, patches.reshape(m * p, dim)], axis=0) + position
        drop_key, tr_key = split_key(key, 2)
        tokens = self.dropout(tokens, key=drop_key, inference=inference)
        out = self.transformer.trace(tokens, key=tr_key, inference=inference)
        tokens = out.tokens
        if self.pooling == "cls":
            pooled = tokens[0]
        elif self.pooling == "mean":
            pooled = jnp.mean(tokens, axis=0)
        elif self.pooling == "sum":
            pooled = jnp.sum(tokens, axis=0)
        elif self.pooling == "mean_patch":
            pooled = jnp.mean(tokens[k:].reshape(m, p, dim), axis=0)
        else:  # agg, none: every token
            pooled = tokens
        if pooled.ndim == 1:
            context = self.head(self.head_norm(pooled))
        else:
            context = apply_tokens(self.head, apply_tokens(self.head_norm, pooled))
        return EncoderTrace(context, out.attention, out.attn_out, out.mlp_out)

    def __call__(
        self,
        patches: Float[Array, "m p dim"],
        t: Float[Array, ""] | None,
        *,
        key: PRNGKeyArray | None,
        inference: bool | None,
    ) -> tuple[Context, Float[Array, "depth heads n n"]]:
        """Pool the set's patch tokens into the context; also returns the attention weights."""
        out = self.trace(patches, t, key=key, inference=inference)
        return out.context, out.attention


class AbstractSetEncoder(AbstractEncoder):
    """A transformer encoder of a set of images into one context (a vector, or tokens for LAG):
    the set becomes patch tokens, read together by one `SetTransformer`."""

    trunk: eqx.AbstractVar[SetTransformer]
    patch_size: eqx.AbstractVar[int]

    @abc.abstractmethod
    def patch_tokens(self, x_set: Float[Array, "m c h w"]) -> Float[Array, "g p dim"]:
        """Embed the set into ``g`` groups of patch tokens, one token per patch position in
        each group (``g = token_groups(m)``)."""

    @abc.abstractmethod
    def token_groups(self, num_images: int) -> int:
        """How many grids of patch tokens the transformer reads for a set of ``num_images``
        images: the token sequence is the special tokens, then ``token_groups`` patch grids one
        after another (one grid with `agg` pooling, which averages the set's grids first)."""

    def trace(
        self,
        x_set: Float[Array, "m c h w"],
        t: Float[Array, ""] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> EncoderTrace:
        """Encode a set, keeping the intermediates that the instrumentation reads.

        **Arguments:** as for `encode`.

        **Returns:** the context, the attention weights `(depth, heads, tokens, tokens)`, and the
        attention and MLP branches of every block `(depth, tokens, dim)`; the token order is that
        of `encode`.
        """
        return self.trunk.trace(self.patch_tokens(x_set), t, key=key, inference=inference)

    def encode(
        self,
        x_set: Float[Array, "m c h w"],
        t: Float[Array, ""] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Context, Float[Array, "depth heads n n"]]:
        """Encode a set and return the context with the attention weights of every layer.

        **Arguments:**
        - `x_set`: the set, any number of images, channels first.
        - `t`: the diffusion timestep, when the encoder has a timestep token; otherwise None.
        - `key`: dropout randomness; needed unless `inference` is true or dropout is zero.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the context and the attention weights `(depth, heads, tokens, tokens)`; the
        token order is class token, timestep token (if any), then the patches of each token group
        in turn. The context is a vector `(hdim,)` for `cls`, `mean` and `sum` pooling, else
        tokens `(n, hdim)`: one per patch position for `mean_patch`, the special tokens and one
        per patch position for `agg`, every token of the sequence for `none`.
        """
        out = self.trace(x_set, t, key=key, inference=inference)
        return out.context, out.attention

    def __call__(
        self,
        x_set: Float[Array, "m c h w"],
        t: Float[Array, ""] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Context:
        """Encode a set into its context; the arguments are those of `encode`."""
        return self.encode(x_set, t, key=key, inference=inference)[0]


def _check_image(image_size: int, patch_size: int) -> int:
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} does not divide image_size={image_size}; "
            "choose a patch size that divides the image size."
        )
    return (image_size // patch_size) ** 2


class ImageTokenEncoder(AbstractSetEncoder):
    """The set ViT: every image of the set becomes its own patch tokens (a linear patch
    embedding), all read by the set transformer."""

    patch_embed: eqx.nn.Linear
    trunk: SetTransformer
    patch_size: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        patch_size: int,
        key: PRNGKeyArray,
        **options: Unpack[SetTransformerOptions],
    ):
        """**Arguments:**
        - `image_size`, `channels`: the square images' size and channels.
        - `patch_size`: side of the square patches; divides `image_size`.
        - `key`: initialisation randomness.
        - `**options`: the set transformer's sizes, pooling, dropout and timestep token, see
          `SetTransformerOptions`.
        """
        num_patches = _check_image(image_size, patch_size)
        embed_key, trunk_key = jax.random.split(key)
        self.patch_embed = eqx.nn.Linear(channels * patch_size**2, options["dim"], key=embed_key)
        self.trunk = SetTransformer(
            num_patches=num_patches, locality=False, key=trunk_key, **options
        )
        self.patch_size = patch_size

    def token_groups(self, num_images: int) -> int:
        """One group of patch tokens per image; one in all with `agg` pooling."""
        return 1 if self.trunk.pooling == "agg" else num_images

    def patch_tokens(self, x_set: Float[Array, "m c h w"]) -> Float[Array, "m p dim"]:
        """Linear embedding of each image's patches."""

        def embed(x: Float[Array, "c h w"]) -> Float[Array, "p dim"]:
            return apply_tokens(self.patch_embed, patchify(x, self.patch_size))

        return jax.vmap(embed)(x_set)


class SetTokenEncoder(AbstractSetEncoder):
    """The paper's sViT: the set stacked on the channel axis becomes one group of patch tokens,
    with Shifted Patch Tokenization and Locality Self-Attention.

    The ``set_size`` images are stacked along channels (channel-major: image ``i`` of channel
    ``c`` is input channel ``c * set_size + i``, as the reference's ``SPT``), the stack is
    concatenated with its four diagonal half-patch shifts (Lee et al. 2021), and each patch
    position becomes one token holding the patch of every image: ``patches`` tokens per set
    instead of ``set_size * patches``, so attention costs ``set_size ** 2`` times less than
    `ImageTokenEncoder`'s. The price is that the encoder reads sets of exactly ``set_size``
    images and depends on their order.
    """

    patch_norm: eqx.nn.LayerNorm
    patch_embed: eqx.nn.Linear
    trunk: SetTransformer
    patch_size: int = eqx.field(static=True)
    set_size: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        set_size: int,
        patch_size: int,
        key: PRNGKeyArray,
        **options: Unpack[SetTransformerOptions],
    ):
        """**Arguments:** as for `ImageTokenEncoder`, and `set_size`, the number of images of
        every set it reads (``ns - 1`` for leave-one-out contexts of sets of ``ns``). Patches are
        shifted by half a patch (at least one pixel)."""
        if set_size < 1:
            raise ValueError(f"SetTokenEncoder set_size={set_size!r} must be an int >= 1.")
        num_patches = _check_image(image_size, patch_size)
        embed_key, trunk_key = jax.random.split(key)
        patch_dim = 5 * set_size * channels * patch_size**2
        self.patch_norm = eqx.nn.LayerNorm(patch_dim)
        self.patch_embed = eqx.nn.Linear(patch_dim, options["dim"], key=embed_key)
        self.trunk = SetTransformer(
            num_patches=num_patches, locality=True, key=trunk_key, **options
        )
        self.patch_size = patch_size
        self.set_size = set_size

    def token_groups(self, num_images: int) -> int:
        """One group of patch tokens for the whole stacked set."""
        del num_images
        return 1

    def patch_tokens(self, x_set: Float[Array, "m c h w"]) -> Float[Array, "1 p dim"]:
        """Stack the set on channels, shift, patchify, LayerNorm, linear: one token per patch
        position."""
        m, c, h, w = x_set.shape
        if m != self.set_size:
            raise ValueError(
                f"this sViT encoder stacks sets of exactly set_size={self.set_size} images on the "
                f"channel axis, got {m}; give {self.set_size} images (ModelConfig.ns - 1), or use "
                "ImageTokenEncoder (ModelConfig.encoder='vit') for sets of any size."
            )
        stacked = jnp.transpose(x_set, (1, 0, 2, 3)).reshape(c * m, h, w)
        shift = max(1, self.patch_size // 2)
        patches = patchify(shifted_patch_input(stacked, shift), self.patch_size)
        return apply_tokens(self.patch_embed, apply_tokens(self.patch_norm, patches))[None]


def encoder_attention_layout(num_images: int, num_patches: int, time_token: bool) -> np.ndarray:
    """For each token of the encoder's sequence, the image it comes from (-1 for special tokens).

    Lets attention maps from `AbstractSetEncoder.encode` be drawn per image.
    """
    special = np.full((2 if time_token else 1,), -1)
    return np.concatenate([special, np.repeat(np.arange(num_images), num_patches)])


ViTSetEncoder = ImageTokenEncoder
"""Another name of `ImageTokenEncoder`, the set ViT."""
SetViTEncoder = SetTokenEncoder
"""Another name of `SetTokenEncoder`, the sViT."""
