"""The guided-diffusion UNet denoiser of the FSDM paper, conditioned by FiLM or by cross-attention,
and the paper's image-level set encoder built from the UNet's downsampling half.

This is the network of the reference implementation of "Few-Shot Diffusion Models" (Giannone,
Nielsen & Winther 2022), itself the UNet of improved DDPM / guided diffusion (Nichol & Dhariwal)
with a set context added:

- ``conditioning="film"``: the context is one vector ``c``. Every residual block computes its
  GroupNorm scale and shift from ``SiLU([time embedding, c])`` by one linear layer, and applies
  ``norm(h) * (1 + scale) + shift``. The attention blocks are spatial self-attention.
- ``conditioning="lag"`` (learned attentive aggregation): the context is a set of tokens. The
  residual blocks see the time embedding only, and every attention block becomes a transformer
  block over the image tokens: self-attention, cross-attention from the image tokens to the context
  tokens, then a GEGLU feed-forward (as the reference's ``SpatialTransformer``).

Every residual branch, every attention output projection and the output convolution are
initialised to zero, so at initialisation each block is the identity on its skip path and the
network outputs exactly zero.

`UNetSetEncoder` reuses the same blocks, without time or context conditioning, to encode each
image of a set into a vector; the set's context is the mean of its images' vectors.
"""

import math
from collections.abc import Callable, Iterator
from typing import Annotated, NamedTuple, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import (
    GROUP_NORM_GROUPS as _GROUPS,
    ConditioningName as Conditioning,
    NonEmpty,
    PositiveInt,
    UnitFloatBelowOne,
)
from ..config import check_arguments
from .conv import Conv2d
from .denoiser import AbstractDenoiser, maybe_checkpoint, rms
from .encoder import AbstractEncoder
from .layers import apply_tokens, timestep_embedding

_Layer = TypeVar("_Layer", eqx.nn.Linear, Conv2d)


def _zero(layer: _Layer) -> _Layer:
    """The same layer with its weight and bias set to zero (guided diffusion's ``zero_module``)."""
    bias = layer.bias
    assert bias is not None
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, (jnp.zeros_like(layer.weight), jnp.zeros_like(bias))
    )


def _tokens(x: Float[Array, "h w c"]) -> Float[Array, "hw c"]:
    return x.reshape(-1, x.shape[-1])


def _norm(norm: eqx.nn.GroupNorm, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    """`eqx.nn.GroupNorm` (its parameters, groups and eps) applied to a channels-last image."""
    h, w, c = x.shape
    groups = x.reshape(h * w, norm.groups, c // norm.groups)
    mean = jnp.mean(groups, axis=(0, 2), keepdims=True)
    var = jnp.mean(jnp.square(groups - mean), axis=(0, 2), keepdims=True)
    out = ((groups - mean) * jax.lax.rsqrt(var + norm.eps)).reshape(x.shape)
    assert norm.weight is not None and norm.bias is not None
    return out * norm.weight.astype(x.dtype)[None, None] + norm.bias.astype(x.dtype)[None, None]


def _attention(
    q: Float[Array, "t nh dh"], k: Float[Array, "s nh dh"], v: Float[Array, "s nh dh"]
) -> Float[Array, "t nh dh"]:
    """Scaled dot-product attention per head, softmax in float32."""
    q, k, v = (jnp.swapaxes(z, 0, 1) for z in (q, k, v))  # heads-major batched matmuls
    logits = jnp.einsum("htd,hsd->hts", q, k) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("hts,hsd->htd", weights, v), 0, 1)


class _ResBlock(eqx.Module):
    """GroupNorm -> SiLU -> conv3x3, FiLM from the conditioning vector, dropout, zero conv3x3.

    With ``cond_dim=0`` the block has no FiLM layer and takes no conditioning vector (the set
    encoder's blocks).
    """

    in_norm: eqx.nn.GroupNorm
    in_conv: Conv2d
    film: eqx.nn.Linear | None
    out_norm: eqx.nn.GroupNorm
    dropout: eqx.nn.Dropout
    out_conv: Conv2d
    skip: Conv2d | None

    def __init__(
        self, in_ch: int, out_ch: int, cond_dim: int, dropout: float, *, key: PRNGKeyArray
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.in_norm = eqx.nn.GroupNorm(_GROUPS, in_ch)
        self.in_conv = Conv2d(in_ch, out_ch, 3, padding=1, key=k1)
        self.film = eqx.nn.Linear(cond_dim, 2 * out_ch, key=k2) if cond_dim else None
        self.out_norm = eqx.nn.GroupNorm(_GROUPS, out_ch)
        self.dropout = eqx.nn.Dropout(dropout)
        self.out_conv = _zero(Conv2d(out_ch, out_ch, 3, padding=1, key=k3))
        self.skip = None if in_ch == out_ch else Conv2d(in_ch, out_ch, 1, key=k4)

    def film_vectors(
        self, cond: Float[Array, " e"]
    ) -> tuple[Float[Array, " c_out"], Float[Array, " c_out"]]:
        """The FiLM scale and shift for the conditioning vector ``cond``."""
        if self.film is None:
            raise ValueError("this residual block was built without FiLM (cond_dim=0).")
        scale, shift = jnp.split(self.film(jax.nn.silu(cond)), 2)
        return scale, shift

    def __call__(
        self,
        x: Float[Array, "h w c"],
        cond: Float[Array, " e"] | None,
        *,
        key: PRNGKeyArray | None,
        inference: bool | None,
    ) -> Float[Array, "h w c_out"]:
        h = _norm(self.out_norm, self.in_conv.channels_last(jax.nn.silu(_norm(self.in_norm, x))))
        if self.film is not None:
            if cond is None:
                raise ValueError("this residual block has FiLM: pass its conditioning vector.")
            scale, shift = self.film_vectors(cond)
            h = h * (1 + scale[None, None]) + shift[None, None]
        h = self.dropout(jax.nn.silu(h), key=key, inference=inference)
        h = self.out_conv.channels_last(h)
        skip = x if self.skip is None else self.skip.channels_last(x)
        return skip + h


class _SelfAttention(eqx.Module):
    """Spatial multi-head self-attention with a zero-initialised output projection.

    The fused q/k/v projection is laid out head-major (each head's q, k, v adjacent), as guided
    diffusion's legacy attention order, so that weights convert one to one.
    """

    norm: eqx.nn.GroupNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, ch: int, num_heads: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.norm = eqx.nn.GroupNorm(_GROUPS, ch)
        self.qkv = eqx.nn.Linear(ch, 3 * ch, key=k1)
        self.proj = _zero(eqx.nn.Linear(ch, ch, key=k2))
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        tokens = _tokens(_norm(self.norm, x))
        qkv = apply_tokens(self.qkv, tokens).reshape(tokens.shape[0], self.num_heads, -1)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = _attention(q, k, v).reshape(tokens.shape)
        out = apply_tokens(self.proj, out)
        return x + out.reshape(x.shape)


class _MultiHeadAttention(eqx.Module):
    """Multi-head attention from query tokens to key/value tokens (bias-free q, k, v)."""

    to_q: eqx.nn.Linear
    to_k: eqx.nn.Linear
    to_v: eqx.nn.Linear
    to_out: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, kv_dim: int, num_heads: int, *, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.to_q = eqx.nn.Linear(dim, dim, use_bias=False, key=kq)
        self.to_k = eqx.nn.Linear(kv_dim, dim, use_bias=False, key=kk)
        self.to_v = eqx.nn.Linear(kv_dim, dim, use_bias=False, key=kv)
        self.to_out = eqx.nn.Linear(dim, dim, key=ko)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "t d"], kv: Float[Array, "s e"]) -> Float[Array, "t d"]:
        def heads(layer: eqx.nn.Linear, z: Float[Array, "n f"]) -> Float[Array, "n nh dh"]:
            return apply_tokens(layer, z).reshape(z.shape[0], self.num_heads, -1)

        out = _attention(heads(self.to_q, x), heads(self.to_k, kv), heads(self.to_v, kv))
        return apply_tokens(self.to_out, out.reshape(x.shape))


class _SpatialTransformer(eqx.Module):
    """LAG attention block: image tokens attend to themselves, then to the context tokens.

    GroupNorm -> 1x1 projection -> [LayerNorm, self-attention], [LayerNorm, cross-attention to the
    context], [LayerNorm, GEGLU feed-forward] (each residual) -> zero-initialised 1x1 projection.
    """

    norm: eqx.nn.GroupNorm
    proj_in: eqx.nn.Linear
    norm1: eqx.nn.LayerNorm
    self_attn: _MultiHeadAttention
    norm2: eqx.nn.LayerNorm
    cross_attn: _MultiHeadAttention
    norm3: eqx.nn.LayerNorm
    ff_in: eqx.nn.Linear
    ff_out: eqx.nn.Linear
    proj_out: eqx.nn.Linear

    def __init__(self, ch: int, context_dim: int, num_heads: int, *, key: PRNGKeyArray):
        k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
        self.norm = eqx.nn.GroupNorm(_GROUPS, ch, eps=1e-6)
        self.proj_in = eqx.nn.Linear(ch, ch, key=k1)
        self.norm1 = eqx.nn.LayerNorm(ch)
        self.self_attn = _MultiHeadAttention(ch, ch, num_heads, key=k2)
        self.norm2 = eqx.nn.LayerNorm(ch)
        self.cross_attn = _MultiHeadAttention(ch, context_dim, num_heads, key=k3)
        self.norm3 = eqx.nn.LayerNorm(ch)
        self.ff_in = eqx.nn.Linear(ch, 8 * ch, key=k4)
        self.ff_out = eqx.nn.Linear(4 * ch, ch, key=k5)
        self.proj_out = _zero(eqx.nn.Linear(ch, ch, key=k6))

    def __call__(
        self, x: Float[Array, "h w c"], context: Float[Array, "n d"]
    ) -> Float[Array, "h w c"]:
        h = apply_tokens(self.proj_in, _tokens(_norm(self.norm, x)))
        z = apply_tokens(self.norm1, h)
        h = h + self.self_attn(z, z)
        h = h + self.cross_attn(apply_tokens(self.norm2, h), context)
        value, gate = jnp.split(apply_tokens(self.ff_in, apply_tokens(self.norm3, h)), 2, axis=-1)
        h = h + apply_tokens(self.ff_out, value * jax.nn.gelu(gate, approximate=False))
        out = apply_tokens(self.proj_out, h)
        return x + out.reshape(x.shape)


_Attention = _SelfAttention | _SpatialTransformer


def _attend(
    attn: _Attention | None,
    h: Float[Array, "h w c"],
    context: Float[Array, "*n d"] | None,
    remat: bool = False,
) -> Float[Array, "h w c"]:
    if attn is None:
        return h
    return maybe_checkpoint(_run_attention, remat)(attn, h, context)


def _run_attention(
    attn: _Attention, h: Float[Array, "h w c"], context: Float[Array, "*n d"] | None
) -> Float[Array, "h w c"]:
    if isinstance(attn, _SelfAttention):
        return attn(h)
    if context is None:
        raise ValueError("a LAG attention block attends to context tokens: pass them.")
    return attn(h, context)


def _run_res(
    block: _ResBlock,
    x: Float[Array, "h w c"],
    cond: Float[Array, " e"] | None,
    key: PRNGKeyArray | None,
    inference: bool | None,
    remat: bool,
) -> Float[Array, "h w c_out"]:
    """The residual block, under `eqx.filter_checkpoint` when ``remat``."""

    def run(
        block: _ResBlock,
        x: Float[Array, "h w c"],
        cond: Float[Array, " e"] | None,
        key: PRNGKeyArray | None,
    ) -> Float[Array, "h w c_out"]:
        return block(x, cond, key=key, inference=inference)

    return maybe_checkpoint(run, remat)(block, x, cond, key)


class _Downsample(eqx.Module):
    """Halve the resolution with a stride-2 conv3x3."""

    conv: Conv2d

    def __init__(self, ch: int, *, key: PRNGKeyArray):
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=1, key=key)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
        return self.conv.channels_last(x)


class _Upsample(eqx.Module):
    """Double the resolution: nearest-neighbour upsampling, then conv3x3."""

    conv: Conv2d

    def __init__(self, ch: int, *, key: PRNGKeyArray):
        self.conv = Conv2d(ch, ch, 3, padding=1, key=key)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
        return self.conv.channels_last(jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1))


class _Stage(eqx.Module):
    """One residual block, an optional attention block and an optional upsampling."""

    res: _ResBlock
    attn: _Attention | None
    upsample: _Upsample | None

    def __call__(
        self,
        x: Float[Array, "h w c"],
        cond: Float[Array, " e"] | None,
        context: Float[Array, "*n d"] | None,
        *,
        key: PRNGKeyArray | None,
        inference: bool | None,
        remat: bool,
    ) -> Float[Array, "h2 w2 c2"]:
        h = _run_res(self.res, x, cond, key, inference, remat)
        h = _attend(self.attn, h, context, remat)
        return h if self.upsample is None else self.upsample(h)


class _Levels(NamedTuple):
    """Where a UNet's levels sit, from its configuration."""

    pad: int
    """Pixels of zero padding that make the image side a multiple of ``2 ** (levels - 1)``."""
    attends: tuple[bool, ...]
    """Whether each level's residual blocks are followed by attention."""
    attention_channels: tuple[int, ...]
    """Channels of every attention block's level, the middle block's included."""


def _levels(
    owner: str,
    model_channels: int,
    channel_mult: tuple[int, ...],
    image_size: int,
    attention_resolutions: tuple[int, ...],
) -> _Levels:
    """Check a UNet configuration's channels and attention sides; raises one `ValueError` that
    names ``owner``."""
    bad = [model_channels * m for m in channel_mult if (model_channels * m) % _GROUPS]
    if bad:
        raise ValueError(
            f"{owner} channels {bad} (model_channels * channel_mult) are not multiples of "
            f"{_GROUPS}, the GroupNorm group count; choose model_channels a multiple of "
            f"{_GROUPS}."
        )
    levels = len(channel_mult)
    factor = 2 ** (levels - 1)
    padded = -(-image_size // factor) * factor
    sides = [padded // 2**i for i in range(levels)]
    unknown = [r for r in attention_resolutions if r not in sides]
    if unknown:
        raise ValueError(
            f"{owner}.attention_resolutions={attention_resolutions!r}: {unknown} are not "
            f"feature-map sides of this {owner}; choose among {sides}."
        )
    attends = tuple(side in attention_resolutions for side in sides)
    channels = [model_channels * m for m, a in zip(channel_mult, attends, strict=True) if a]
    return _Levels(padded - image_size, attends, (*channels, model_channels * channel_mult[-1]))


_A = TypeVar("_A", bound=_Attention)


def _down_half(
    in_channels: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    geometry: _Levels,
    res: Callable[[int, int], _ResBlock],
    attn: Callable[[int], _A],
    keys: Iterator[PRNGKeyArray],
) -> tuple[Conv2d, tuple[_Stage | _Downsample, ...], list[int], _ResBlock, _A, _ResBlock]:
    """The input convolution from ``in_channels``, the downsampling half and the middle block
    that `UNet` and `UNetSetEncoder` share.

    The downsampling half has, per level, ``num_res_blocks`` residual blocks (each followed by
    attention where ``geometry`` says the level attends), then a downsampling between levels; the
    middle block is residual, attention, residual. Everything is built in that order, ``res``
    and ``attn`` drawing their own keys and the rest taking the next of ``keys``.

    **Returns:** the input convolution, the downsampling blocks, the channels after the input
    convolution and after each downsampling block (the UNet's skip channels), and the middle
    block's residual, attention and residual blocks.
    """
    ch = model_channels * channel_mult[0]
    conv_in = Conv2d(in_channels, ch, 3, padding=1, key=next(keys))
    blocks: list[_Stage | _Downsample] = []
    channels = [ch]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = model_channels * mult
            block = _Stage(res(ch, out), attn(out) if geometry.attends[level] else None, None)
            blocks.append(block)
            ch = out
            channels.append(ch)
        if level != len(channel_mult) - 1:
            blocks.append(_Downsample(ch, key=next(keys)))
            channels.append(ch)
    return conv_in, tuple(blocks), channels, res(ch, ch), attn(ch), res(ch, ch)


def _run_down(
    blocks: tuple[_Stage | _Downsample, ...],
    h: Float[Array, "h w c"],
    cond: Float[Array, " e"] | None,
    context: Float[Array, "*n d"] | None,
    keys: list[PRNGKeyArray] | list[None],
    inference: bool | None,
    remat: bool,
) -> list[Array]:
    """Run the downsampling half, taking one dropout key from the end of ``keys`` per residual
    stage; returns the output of every block."""
    outs: list[Array] = []
    for block in blocks:
        if isinstance(block, _Stage):
            h = block(h, cond, context, key=keys.pop(), inference=inference, remat=remat)
        else:
            h = block(h)
        outs.append(h)
    return outs


def _padded_channels_last(
    x: Float[Array, "c h w"], pad: int, dtype: jnp.dtype
) -> Float[Array, "hp wp c"]:
    """The image channels last in ``dtype``, zero-padded symmetrically by ``pad`` pixels per
    axis (the extra pixel of an odd ``pad`` after)."""
    lo, hi = pad // 2, pad - pad // 2
    x = jnp.moveaxis(x.astype(dtype), 0, -1)
    return jnp.pad(x, ((lo, hi), (lo, hi), (0, 0))) if pad else x


class UNet(AbstractDenoiser):
    """The guided-diffusion UNet with a set context, as in the reference code of FSDM.

    The paper's CIFAR-100 configuration (``vfsddpm_cifar100_vit_film_mean_sigma``) is
    ``UNet(in_channels=3, model_channels=64, out_channels=6, num_res_blocks=2,
    attention_resolutions=(16, 8), channel_mult=(1, 2, 3, 4), num_heads=4, dropout=0.2,
    context_dim=256, conditioning="film", image_size=32, key=key)``: 23,949,702 parameters, the
    reference count exactly (28,335,686 with ``conditioning="lag"``, as the reference's LAG UNet).
    Every reference layer has one counterpart here (its 1x1 convolutions are linear layers over
    the pixel tokens), so reference weights convert one to one; as in the reference, the LAG
    transformer blocks have no dropout.

    Images whose side is not a multiple of ``2 ** (len(channel_mult) - 1)`` (28x28 Omniglot or
    MNIST with four levels) are zero-padded symmetrically to the next multiple and the output is
    cropped back; the reference pads the same way but resizes its output by nearest
    interpolation, which drops rows and columns unevenly instead of cropping the padding.
    """

    time_in: eqx.nn.Linear
    time_out: eqx.nn.Linear
    conv_in: Conv2d
    down: tuple[_Stage | _Downsample, ...]
    mid_res1: _ResBlock
    mid_attn: _Attention
    mid_res2: _ResBlock
    up: tuple[_Stage, ...]
    out_norm: eqx.nn.GroupNorm
    out_conv: Conv2d
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    model_channels: int = eqx.field(static=True)
    context_dim: int = eqx.field(static=True)
    image_size: int = eqx.field(static=True)
    conditioning: Conditioning = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    pad: int = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        model_channels: PositiveInt,
        out_channels: PositiveInt,
        num_res_blocks: PositiveInt,
        attention_resolutions: tuple[PositiveInt, ...],
        channel_mult: Annotated[tuple[PositiveInt, ...], NonEmpty],
        num_heads: PositiveInt,
        dropout: UnitFloatBelowOne,
        context_dim: PositiveInt,
        conditioning: Conditioning,
        image_size: PositiveInt,
        remat: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `in_channels`: image channels.
        - `model_channels`: channels of the first level; level `i` has
          `model_channels * channel_mult[i]`, each a multiple of 32 (GroupNorm with 32 groups).
        - `out_channels`: predicted channels (`2 * in_channels` when the variance is learned).
        - `num_res_blocks`: residual blocks per level on the way down (one more on the way up).
        - `attention_resolutions`: feature-map sides (e.g. `(16, 8)` for a 32x32 image) whose
          residual blocks are followed by attention; the middle block always has attention.
        - `channel_mult`: channel multiplier per level; the resolution halves between levels.
        - `num_heads`: attention heads; it must divide the channels of every attention block.
        - `dropout`: dropout rate inside the residual blocks.
        - `context_dim`: width of the context vector (FiLM) or of each context token (LAG).
        - `conditioning`: `"film"` (context vector into every residual block's scale/shift) or
          `"lag"` (context tokens through cross-attention in every attention block).
        - `image_size`: side of the (square) input image.
        - `remat`: recompute the activations of each residual and attention block in the
          backward pass instead of storing them (`eqx.filter_checkpoint`).
        - `key`: initialisation randomness.
        """
        check_arguments(UNet.__init__, locals())
        self.remat = remat
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.image_size = image_size
        self.conditioning = conditioning
        self.dropout = dropout
        geometry = _levels("UNet", model_channels, channel_mult, image_size, attention_resolutions)
        self.pad = geometry.pad
        if any(c % num_heads for c in geometry.attention_channels):
            raise ValueError(
                f"UNet.num_heads={num_heads!r} must divide the channels "
                f"{sorted(set(geometry.attention_channels))} of every attention block."
            )
        levels = len(channel_mult)

        time_dim = 4 * model_channels
        cond_dim = time_dim + (context_dim if conditioning == "film" else 0)
        keys = iter(jax.random.split(key, 7 + levels * (4 * num_res_blocks + 4)))

        def res(cin: int, cout: int) -> _ResBlock:
            return _ResBlock(cin, cout, cond_dim, dropout, key=next(keys))

        def attn(ch: int) -> _Attention:
            if conditioning == "film":
                return _SelfAttention(ch, num_heads, key=next(keys))
            return _SpatialTransformer(ch, context_dim, num_heads, key=next(keys))

        self.time_in = eqx.nn.Linear(model_channels, time_dim, key=next(keys))
        self.time_out = eqx.nn.Linear(time_dim, time_dim, key=next(keys))
        self.conv_in, self.down, skips, self.mid_res1, self.mid_attn, self.mid_res2 = _down_half(
            in_channels, model_channels, channel_mult, num_res_blocks, geometry, res, attn, keys
        )
        ch = skips[-1]
        up: list[_Stage] = []
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                out = model_channels * channel_mult[level]
                block = res(ch + skips.pop(), out)
                ch = out
                upsample = _Upsample(ch, key=next(keys)) if level and i == num_res_blocks else None
                up.append(_Stage(block, attn(ch) if geometry.attends[level] else None, upsample))
        self.up = tuple(up)
        self.out_norm = eqx.nn.GroupNorm(_GROUPS, ch)
        self.out_conv = _zero(Conv2d(ch, out_channels, 3, padding=1, key=next(keys)))

    def condition(
        self, t: Float[Array, ""], context: Float[Array, " d"] | Float[Array, "n d"]
    ) -> Float[Array, " e"]:
        """The residual blocks' conditioning vector: the time embedding, with the context
        appended for FiLM."""
        frequencies = timestep_embedding(t, self.model_channels).astype(self.compute_dtype)
        emb = self.time_out(jax.nn.silu(self.time_in(frequencies)))
        if self.conditioning == "film":
            return jnp.concatenate([emb, context.astype(self.compute_dtype)])
        return emb

    def _res_blocks(self) -> dict[str, _ResBlock]:
        """Every residual block by name: `down{i}`, `mid1`, `mid2`, `up{i}`."""
        stages = [b for b in self.down if isinstance(b, _Stage)]
        blocks = {f"down{i}": stage.res for i, stage in enumerate(stages)}
        blocks["mid1"], blocks["mid2"] = self.mid_res1, self.mid_res2
        blocks.update({f"up{i}": stage.res for i, stage in enumerate(self.up)})
        return blocks

    def modulation(
        self, t: Float[Array, ""], context: Float[Array, " d"] | Float[Array, "n d"]
    ) -> dict[str, Float[Array, ""]]:
        """RMS of the FiLM vectors: `<block>/scale` and `<block>/shift` for every residual
        block (`down{i}`, `mid1`, `mid2`, `up{i}`); see `AbstractDenoiser.modulation`."""
        cond = self.condition(t, context)
        out: dict[str, Float[Array, ""]] = {}
        for name, block in self._res_blocks().items():
            scale, shift = block.film_vectors(cond)
            out[f"{name}/scale"], out[f"{name}/shift"] = rms(scale), rms(shift)
        return out

    def __call__(
        self,
        x_t: Float[Array, "c h w"],
        t: Float[Array, ""],
        context: Float[Array, " d"] | Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "c_out h w"]:
        """Predict epsilon (and the variance channels) for one noisy image.

        **Arguments:**
        - `x_t`: the noisy image, `(in_channels, image_size, image_size)`.
        - `t`: the timestep in [0, T), possibly fractional.
        - `context`: a vector `(context_dim,)` for FiLM, or tokens `(n, context_dim)` for LAG.
        - `key`: dropout randomness; needed when `inference` is false and dropout is positive.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the prediction, `(out_channels, image_size, image_size)`, in the weights'
        dtype.
        """
        self._check_inputs(x_t, context, key, inference)
        n_stages = len(self.up) + sum(isinstance(b, _Stage) for b in self.down) + 2
        keys = [None] * n_stages if key is None else list(jax.random.split(key, n_stages))
        remat = self.remat
        cond = self.condition(t, context)
        context = context.astype(self.compute_dtype)

        h = self.conv_in.channels_last(_padded_channels_last(x_t, self.pad, self.compute_dtype))
        skips = [h, *_run_down(self.down, h, cond, context, keys, inference, remat)]
        h = skips[-1]
        h = _run_res(self.mid_res1, h, cond, keys.pop(), inference, remat)
        h = _attend(self.mid_attn, h, context, remat)
        h = _run_res(self.mid_res2, h, cond, keys.pop(), inference, remat)
        for block in self.up:
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = block(h, cond, context, key=keys.pop(), inference=inference, remat=remat)
        out = self.out_conv.channels_last(jax.nn.silu(_norm(self.out_norm, h)))
        if self.pad:
            lo = self.pad // 2
            out = out[lo : lo + self.image_size, lo : lo + self.image_size]
        return jnp.moveaxis(out, -1, 0)

    def _check_inputs(
        self,
        x_t: Float[Array, "c h w"],
        context: Float[Array, "*n d"],
        key: PRNGKeyArray | None,
        inference: bool | None,
    ) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if x_t.shape != want:
            raise ValueError(
                f"UNet expects one image of shape {want} (channels first, no batch axis; "
                f"jax.vmap over a batch), got {x_t.shape}."
            )
        if self.conditioning == "film":
            want_ctx, form = (self.context_dim,), "one vector (context_dim,)"
        else:
            want_ctx, form = (context.shape[0], self.context_dim), "tokens (n, context_dim)"
        if context.shape != want_ctx:
            raise ValueError(
                f"UNet with conditioning={self.conditioning!r} expects the context as {form} "
                f"with context_dim={self.context_dim}, got shape {context.shape}."
            )
        if inference is None:
            inference = all(block.dropout.inference for block in self._res_blocks().values())
        if key is None and not inference and self.dropout > 0:
            raise ValueError(
                f"UNet has dropout={self.dropout}: pass `key=` for training, or "
                "`inference=True` to disable dropout."
            )


class UNetSetEncoder(AbstractEncoder):
    """The FSDM paper's image-level set encoder: the UNet's downsampling half and middle block,
    applied to each image of the set alone, then the mean of the image vectors over the set.

    The network is guided diffusion's ``EncoderUNetModel`` as the reference code of FSDM uses it
    (``encoder_mode="unet"``): a conv3x3 stem, per level ``num_res_blocks`` residual blocks
    (attention after them at the listed feature-map sides) and a downsampling between levels,
    the middle block (residual, attention, residual), then GroupNorm -> SiLU -> global average
    pool -> a zero-initialised linear map (a 1x1 convolution) to ``hdim``. Its output for a set
    is the mean over the images, so it reads sets of any size and does not depend on their
    order. The attention heads are ``head_channels`` wide (the reference's
    ``num_head_channels=64``).

    Differences from the reference code:
    - The reference draws a random diffusion timestep for every image at every call, training
      and sampling alike, and feeds its embedding to every residual block's scale and shift;
      here the encoder reads no timestep: its residual blocks have no FiLM layer, so the context
      is a deterministic function of the set.
    - The reference reads its default ``attention_resolutions=(16, 8)`` as downsampling factors,
      so for 32x32 images it attends only at the 4x4 level (and in the middle block); here
      ``attention_resolutions`` are feature-map sides, as for `UNet`.
    - The reference pools with CLIP-style attention pooling (its default ``pool="attention"``)
      and downsamples with residual blocks that average-pool; here the pooling is guided
      diffusion's ``"adaptive"`` global average and the downsampling the denoiser's strided
      conv3x3.
    """

    conv_in: Conv2d
    down: tuple[_Stage | _Downsample, ...]
    mid_res1: _ResBlock
    mid_attn: _SelfAttention
    mid_res2: _ResBlock
    out_norm: eqx.nn.GroupNorm
    out_proj: eqx.nn.Linear
    image_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pad: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        image_size: PositiveInt,
        channels: PositiveInt,
        model_channels: PositiveInt,
        channel_mult: Annotated[tuple[PositiveInt, ...], NonEmpty],
        num_res_blocks: PositiveInt,
        attention_resolutions: tuple[PositiveInt, ...],
        head_channels: PositiveInt,
        hdim: PositiveInt,
        dropout: UnitFloatBelowOne,
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `image_size`, `channels`: the square images' side and channels.
        - `model_channels`, `channel_mult`, `num_res_blocks`, `attention_resolutions`: the
          levels, as for `UNet`.
        - `head_channels`: width of each attention head; divides the channels of every
          attention block.
        - `hdim`: the context size.
        - `dropout`: dropout rate inside the residual blocks.
        - `key`: initialisation randomness.
        """
        check_arguments(UNetSetEncoder.__init__, locals())
        geometry = _levels(
            "UNetSetEncoder", model_channels, channel_mult, image_size, attention_resolutions
        )
        if any(c % head_channels for c in geometry.attention_channels):
            raise ValueError(
                f"UNetSetEncoder.head_channels={head_channels!r} must divide the channels "
                f"{sorted(set(geometry.attention_channels))} of every attention block."
            )
        keys = iter(jax.random.split(key, 6 + len(channel_mult) * (2 * num_res_blocks + 1)))

        def res(cin: int, cout: int) -> _ResBlock:
            return _ResBlock(cin, cout, 0, dropout, key=next(keys))

        def attn(ch: int) -> _SelfAttention:
            return _SelfAttention(ch, ch // head_channels, key=next(keys))

        self.conv_in, self.down, skips, self.mid_res1, self.mid_attn, self.mid_res2 = _down_half(
            channels, model_channels, channel_mult, num_res_blocks, geometry, res, attn, keys
        )
        ch = skips[-1]
        self.out_norm = eqx.nn.GroupNorm(_GROUPS, ch)
        self.out_proj = _zero(eqx.nn.Linear(ch, hdim, key=next(keys)))
        self.image_size = image_size
        self.channels = channels
        self.pad = geometry.pad

    def embed(
        self,
        x: Float[Array, "c h w"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, " hdim"]:
        """The vector of one image, before the mean over the set.

        **Arguments:** `x`, one image channels first; `key` and `inference` as for `__call__`.

        **Returns:** `(hdim,)`, in the weights' dtype.
        """
        if x.shape != (self.channels, self.image_size, self.image_size):
            raise ValueError(
                f"UNetSetEncoder expects images of shape "
                f"{(self.channels, self.image_size, self.image_size)}, got {x.shape}."
            )
        n_res = sum(isinstance(b, _Stage) for b in self.down) + 2
        keys = [None] * n_res if key is None else list(jax.random.split(key, n_res))
        dtype = self.conv_in.weight.dtype
        h = self.conv_in.channels_last(_padded_channels_last(x, self.pad, dtype))
        h = _run_down(self.down, h, None, None, keys, inference, False)[-1]
        h = _run_res(self.mid_res1, h, None, keys.pop(), inference, False)
        h = self.mid_attn(h)
        h = _run_res(self.mid_res2, h, None, keys.pop(), inference, False)
        pooled = jnp.mean(jax.nn.silu(_norm(self.out_norm, h)), axis=(0, 1))
        return self.out_proj(pooled)

    def __call__(
        self,
        x_set: Float[Array, "m c h w"],
        t: Float[Array, ""] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, " hdim"]:
        """The context of a set: the mean over its images of `embed`.

        **Arguments:**
        - `x_set`: the set, any number of images, channels first.
        - `t`: must be None: this encoder reads no timestep.
        - `key`: dropout randomness (one key per image is split from it); needed unless
          `inference` is true or dropout is zero.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the context `(hdim,)`, in the weights' dtype.
        """
        if t is not None:
            raise ValueError(
                "the UNet set encoder reads no timestep (ModelConfig.encoder_time_token must be "
                "False with encoder='unet'): pass t=None."
            )
        keys = None if key is None else jax.random.split(key, x_set.shape[0])

        def one(x: Float[Array, "c h w"], k: PRNGKeyArray | None) -> Float[Array, " hdim"]:
            return self.embed(x, key=k, inference=inference)

        return jnp.mean(jax.vmap(one)(x_set, keys), axis=0)
