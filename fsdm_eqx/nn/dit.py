"""DiT (Peebles & Xie 2023): a transformer denoiser with adaLN-Zero conditioning.

Patches of the noisy image become tokens with fixed 2-D sin-cos positions; each block modulates
its (affine-free) LayerNorms with a shift and a scale, and gates its attention and MLP branches,
all regressed from the conditioning vector by a linear layer that starts at zero, so at
initialisation every block is the identity and the output is zero. The conditioning vector is the
timestep embedding, plus a projection of the context vector in `film` mode; in `lag` mode the
context is a set of tokens that the image tokens attend to through a cross-attention in every
block, whose output projection also starts at zero.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .attention import MultiheadAttention
from .denoiser import AbstractDenoiser, maybe_checkpoint, rms
from .layers import MLP, apply_tokens, make_linear, timestep_embedding, zero_linear

Conditioning = Literal["film", "lag"]
ADALN_PARTS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
"""The six adaLN-Zero vectors of a DiT block, in the order its modulation layer outputs them."""
DIT_SIZES: dict[str, tuple[int, int, int]] = {"S": (384, 12, 6), "B": (768, 12, 12)}
"""Named DiT sizes: (hidden width, depth, heads)."""

_xavier = jax.nn.initializers.xavier_uniform()


def sincos_position_embedding(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of a ``grid_size x grid_size`` grid of patches.

    Half of the channels encode the row, half the column, each as ``[sin(pos w), cos(pos w)]``
    with ``w_k = 10000 ** (-k / (dim / 4))``, as in MAE and DiT.

    **Arguments:**
    - `dim`: the embedding size, a multiple of 4.
    - `grid_size`: patches per side.

    **Returns:** a float32 numpy array `(grid_size**2, dim)`, patches in row-major order.
    """
    if dim % 4:
        raise ValueError(
            f"the DiT hidden size {dim} must be a multiple of 4 for sin-cos positions."
        )
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed(rows), embed(cols)], axis=1).astype(np.float32)


def modulate(
    x: Float[Array, "n d"], shift: Float[Array, " d"], scale: Float[Array, " d"]
) -> Float[Array, "n d"]:
    """adaLN modulation ``x * (1 + scale) + shift``, broadcast over tokens."""
    return x * (1.0 + scale[None]) + shift[None]


class TimestepEmbedder(eqx.Module):
    """Sinusoidal embedding of ``t``, then ``Linear -> SiLU -> Linear`` (weights N(0, 0.02))."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    frequency_dim: int = eqx.field(static=True)

    def __init__(self, hidden: int, *, frequency_dim: int = 256, key: PRNGKeyArray):
        """**Arguments:** the output width `hidden`, the sinusoid size and the init key."""
        key1, key2 = jax.random.split(key)
        normal = jax.nn.initializers.normal(0.02)
        self.fc1 = make_linear(frequency_dim, hidden, weight_init=normal, key=key1)
        self.fc2 = make_linear(hidden, hidden, weight_init=normal, key=key2)
        self.frequency_dim = frequency_dim

    def __call__(self, t: Float[Array, ""]) -> Float[Array, " hidden"]:
        """Embed the (possibly fractional) timestep ``t``, in the dtype of the weights."""
        frequencies = timestep_embedding(t, self.frequency_dim).astype(self.fc1.weight.dtype)
        return self.fc2(jax.nn.silu(self.fc1(frequencies)))


WARM_START_STD = 0.02
"""Standard deviation of the adaLN and output weights in a warm start (`gate_bias != 0`)."""


def _small_linear(linear: eqx.nn.Linear, *, key: PRNGKeyArray) -> eqx.nn.Linear:
    """The layer with small normal weights and a zero bias: a warm start's adaLN-Zero layers."""
    linear = zero_linear(linear)
    weight = WARM_START_STD * jax.random.normal(key, linear.weight.shape, linear.weight.dtype)
    return eqx.tree_at(lambda m: m.weight, linear, weight)


def _zero_start(linear: eqx.nn.Linear, *, key: PRNGKeyArray) -> eqx.nn.Linear:
    del key
    return zero_linear(linear)


class DiTBlock(eqx.Module):
    """One DiT block with adaLN-Zero (and, for LAG, a zero-initialised cross-attention)."""

    norm1: eqx.nn.LayerNorm
    attention: MultiheadAttention
    norm_cross: eqx.nn.LayerNorm | None
    cross_attention: MultiheadAttention | None
    norm2: eqx.nn.LayerNorm
    mlp: MLP
    modulation: eqx.nn.Linear

    def __init__(
        self,
        hidden: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        gate_bias: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `hidden`, `num_heads`, `mlp_ratio`: the block's width, heads and MLP width ratio.
        - `cross_attention`: add a cross-attention to context tokens (LAG).
        - `gate_bias`: initial bias of the two gates; 0 is adaLN-Zero (the block starts as the
          identity), a non-zero value warm-starts the branches: the gates open by `gate_bias`
          and the adaLN (and cross-attention output) weights start small instead of zero, so
          that the conditioning reaches the output from the first step.
        - `key`: initialisation randomness.
        """
        attn_key, cross_key, mlp_key, mod_key = jax.random.split(key, 4)
        start = _zero_start if gate_bias == 0 else _small_linear
        head_dim = hidden // num_heads

        def norm() -> eqx.nn.LayerNorm:
            return eqx.nn.LayerNorm(hidden, eps=1e-6, use_weight=False, use_bias=False)

        self.norm1 = norm()
        self.attention = MultiheadAttention(
            hidden,
            num_heads=num_heads,
            head_dim=head_dim,
            qkv_bias=True,
            weight_init=_xavier,
            key=attn_key,
        )
        if cross_attention:
            self.norm_cross = norm()
            cross = MultiheadAttention(
                hidden,
                num_heads=num_heads,
                head_dim=head_dim,
                qkv_bias=True,
                weight_init=_xavier,
                key=cross_key,
            )
            to_out = start(cross.to_out, key=jax.random.fold_in(cross_key, 1))
            self.cross_attention = eqx.tree_at(lambda m: m.to_out, cross, to_out)
        else:
            self.norm_cross = None
            self.cross_attention = None
        self.norm2 = norm()
        self.mlp = MLP(
            hidden,
            int(hidden * mlp_ratio),
            approximate_gelu=True,
            weight_init=_xavier,
            key=mlp_key,
        )
        modulation = start(eqx.nn.Linear(hidden, 6 * hidden, key=mod_key), key=mod_key)
        assert modulation.bias is not None
        bias = modulation.bias.at[2 * hidden : 3 * hidden].set(gate_bias)
        bias = bias.at[5 * hidden :].set(gate_bias)
        self.modulation = eqx.tree_at(lambda m: m.bias, modulation, bias)

    def adaln(self, c: Float[Array, " d"]) -> tuple[Float[Array, " d"], ...]:
        """The six adaLN-Zero vectors for the conditioning vector ``c`` (see `ADALN_PARTS`)."""
        return tuple(jnp.split(self.modulation(jax.nn.silu(c)), 6))

    def __call__(
        self,
        x: Float[Array, "n d"],
        c: Float[Array, " d"],
        context: Float[Array, "m d"] | None = None,
    ) -> Float[Array, "n d"]:
        """Apply the block to the tokens ``x`` given the conditioning vector ``c``.

        **Arguments:**
        - `x`: the image tokens.
        - `c`: the conditioning vector (timestep embedding, plus the context for FiLM).
        - `context`: the projected context tokens (LAG only).

        **Returns:** the new tokens.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c)
        h, _ = self.attention(modulate(apply_tokens(self.norm1, x), shift1, scale1))
        x = x + gate1[None] * h
        if self.cross_attention is not None and self.norm_cross is not None:
            if context is None:
                raise ValueError("this DiT block cross-attends (LAG): pass context tokens.")
            h, _ = self.cross_attention(apply_tokens(self.norm_cross, x), context)
            x = x + h
        h = self.mlp(modulate(apply_tokens(self.norm2, x), shift2, scale2))
        return x + gate2[None] * h


class FinalLayer(eqx.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear map back to patch pixels."""

    norm: eqx.nn.LayerNorm
    modulation: eqx.nn.Linear
    linear: eqx.nn.Linear

    def __init__(self, hidden: int, patch_dim: int, *, warm: bool = False, key: PRNGKeyArray):
        """**Arguments:** the width, the pixels per output patch, `warm` (small weights
        instead of zeros, with the blocks' warm start) and the init key."""
        key1, key2 = jax.random.split(key)
        start = _small_linear if warm else _zero_start
        self.norm = eqx.nn.LayerNorm(hidden, eps=1e-6, use_weight=False, use_bias=False)
        self.modulation = start(eqx.nn.Linear(hidden, 2 * hidden, key=key1), key=key1)
        self.linear = start(eqx.nn.Linear(hidden, patch_dim, key=key2), key=key2)

    def adaln(self, c: Float[Array, " d"]) -> tuple[Float[Array, " d"], Float[Array, " d"]]:
        """The shift and scale vectors for the conditioning vector ``c``."""
        shift, scale = jnp.split(self.modulation(jax.nn.silu(c)), 2)
        return shift, scale

    def __call__(self, x: Float[Array, "n d"], c: Float[Array, " d"]) -> Float[Array, "n pd"]:
        """Map the tokens to patch pixels, modulated by ``c``."""
        shift, scale = self.adaln(c)
        return apply_tokens(self.linear, modulate(apply_tokens(self.norm, x), shift, scale))


class DiT(AbstractDenoiser):
    """The DiT denoiser of one image, conditioned on a timestep and a context (FiLM or LAG)."""

    patch_embed: eqx.nn.Linear
    t_embedder: TimestepEmbedder
    context_proj: eqx.nn.Linear
    blocks: tuple[DiTBlock, ...]
    final: FinalLayer
    image_size: int = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    conditioning: Conditioning = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        context_dim: int,
        conditioning: Conditioning = "film",
        gate_bias: float = 0.0,
        remat: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `image_size`, `in_channels`: the square images' size and channels.
        - `out_channels`: output channels, `2 * in_channels` for a learned variance (default
          `in_channels`).
        - `patch_size`: side of the square patches; divides `image_size`.
        - `hidden`, `depth`, `num_heads`, `mlp_ratio`: the transformer (see `DIT_SIZES`).
        - `context_dim`: size of the context vector (FiLM) or of each context token (LAG).
        - `conditioning`: `film` or `lag`.
        - `gate_bias`: initial bias of the blocks' gates (0: adaLN-Zero; otherwise a warm start,
          with small adaLN and output weights, so that the context acts from the first step).
        - `remat`: recompute each block's activations in the backward pass instead of storing
          them (`eqx.filter_checkpoint`): less memory, about one more forward pass of compute.
        - `key`: initialisation randomness.
        """
        if image_size % patch_size:
            raise ValueError(
                f"DiT patch_size={patch_size} does not divide image_size={image_size}; "
                "choose a patch size that divides the image size."
            )
        if hidden % num_heads:
            raise ValueError(f"DiT hidden={hidden} is not divisible by num_heads={num_heads}.")
        if conditioning not in ("film", "lag"):
            raise ValueError(f"conditioning={conditioning!r} is not allowed; use 'film' or 'lag'.")
        out_channels = in_channels if out_channels is None else out_channels
        embed_key, t_key, ctx_key, blocks_key, final_key = jax.random.split(key, 5)
        self.patch_embed = make_linear(
            in_channels * patch_size**2, hidden, weight_init=_xavier, key=embed_key
        )
        self.t_embedder = TimestepEmbedder(hidden, key=t_key)
        self.context_proj = make_linear(
            context_dim, hidden, weight_init=jax.nn.initializers.normal(0.02), key=ctx_key
        )
        self.blocks = tuple(
            DiTBlock(
                hidden,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                cross_attention=conditioning == "lag",
                gate_bias=gate_bias,
                key=k,
            )
            for k in jax.random.split(blocks_key, depth)
        )
        self.final = FinalLayer(
            hidden, patch_size**2 * out_channels, warm=gate_bias != 0, key=final_key
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.hidden = hidden
        self.conditioning = conditioning
        self.remat = remat

    def condition(
        self, t: Float[Array, ""], context: Float[Array, " d"] | Float[Array, "n d"]
    ) -> tuple[Float[Array, " hidden"], Float[Array, "m hidden"] | None]:
        """The conditioning vector of the adaLN layers and, for LAG, the context tokens."""
        context = context.astype(self.compute_dtype)
        c = self.t_embedder(t)
        if self.conditioning == "film":
            if context.ndim != 1:
                raise ValueError(
                    f"FiLM conditioning takes one context vector, got shape {context.shape}; "
                    "use pooling 'cls', 'mean' or 'sum'."
                )
            return c + self.context_proj(context), None
        if context.ndim != 2:
            raise ValueError(
                f"LAG conditioning takes context tokens, got shape {context.shape}; "
                "use pooling 'mean_patch', 'agg' or 'none'."
            )
        return c, apply_tokens(self.context_proj, context)

    def embed(
        self,
        x_t: Float[Array, "c h w"],
        t: Float[Array, ""],
        context: Float[Array, " d"] | Float[Array, "n d"],
    ) -> tuple[Float[Array, "p hidden"], Float[Array, " hidden"], Float[Array, "m hidden"] | None]:
        """The input tokens (with positions), the conditioning vector and the context tokens."""
        if x_t.shape != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"DiT expects an image of shape (c, h, w) = "
                f"{(self.in_channels, self.image_size, self.image_size)}, got {x_t.shape}."
            )
        grid = self.image_size // self.patch_size
        dtype = self.compute_dtype
        patches = patchify_channels_first(x_t.astype(dtype), self.patch_size)
        tokens = apply_tokens(self.patch_embed, patches)
        tokens = tokens + jnp.asarray(sincos_position_embedding(self.hidden, grid), dtype)
        c, context_tokens = self.condition(t, context)
        return tokens, c, context_tokens

    def __call__(
        self,
        x_t: Float[Array, "c h w"],
        t: Float[Array, ""],
        context: Float[Array, " d"] | Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "c_out h w"]:
        """Predict epsilon (and the variance channels) for the noisy image ``x_t``.

        **Arguments:**
        - `x_t`: the noisy image, channels first.
        - `t`: the diffusion timestep (fractional allowed).
        - `context`: a vector for `film`, tokens for `lag`.
        - `key`, `inference`: accepted for the denoiser interface; DiT has no dropout.

        **Returns:** the prediction `(out_channels, h, w)`, in the weights' dtype.
        """
        del key, inference
        tokens, c, context_tokens = self.embed(x_t, t, context)

        def apply(
            block: DiTBlock,
            tokens: Float[Array, "p hidden"],
            c: Float[Array, " hidden"],
            context_tokens: Float[Array, "m hidden"] | None,
        ) -> Float[Array, "p hidden"]:
            return block(tokens, c, context_tokens)

        apply = maybe_checkpoint(apply, self.remat)
        for block in self.blocks:
            tokens = apply(block, tokens, c, context_tokens)
        return unpatchify(self.final(tokens, c), self.patch_size, self.out_channels)

    def modulation(
        self, t: Float[Array, ""], context: Float[Array, " d"] | Float[Array, "n d"]
    ) -> dict[str, Float[Array, ""]]:
        """RMS of the adaLN-Zero vectors: `block{i}/<part>` for each part of `ADALN_PARTS`,
        and `final/shift`, `final/scale`; see `AbstractDenoiser.modulation`."""
        c, _ = self.condition(t, context)
        out: dict[str, Float[Array, ""]] = {}
        for i, block in enumerate(self.blocks):
            for part, vector in zip(ADALN_PARTS, block.adaln(c), strict=True):
                out[f"block{i}/{part}"] = rms(vector)
        shift, scale = self.final.adaln(c)
        out["final/shift"], out["final/scale"] = rms(shift), rms(scale)
        return out


def patchify_channels_first(x: Float[Array, "c h w"], patch_size: int) -> Float[Array, "n pd"]:
    """Patches flattened as ``(c, p, p)``, the layout of a strided convolution's weight."""
    c, h, w = x.shape
    p = patch_size
    x = x.reshape(c, h // p, p, w // p, p)
    return x.transpose(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)


def unpatchify(
    tokens: Float[Array, "n pd"], patch_size: int, channels: int
) -> Float[Array, "c h w"]:
    """Inverse of `patchify_channels_first` for a square image."""
    grid = math.isqrt(tokens.shape[0])
    p = patch_size
    x = tokens.reshape(grid, grid, channels, p, p)
    return x.transpose(2, 0, 3, 1, 4).reshape(channels, grid * p, grid * p)
