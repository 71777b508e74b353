"""Multi-head attention, and the pre-norm transformer blocks built from it.

Attention always returns its weights next to its output, and the transformer blocks can return
their residual branches (`trace`): callers that only need the output drop them (and XLA drops
their computation), while the instrumentation reads them from the same code path. Locality
Self-Attention (Lee et al. 2021, "Vision Transformer for Small-Size Datasets") is a switch of the
same module: a learned softmax temperature and a masked diagonal. The layer helpers and the
feed-forward MLP live in `layers`.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

# The layer helpers, importable from here as well.
from .layers import (
    MLP as MLP,
    Initializer as Initializer,
    apply_tokens as apply_tokens,
    make_linear as make_linear,
    patchify as patchify,
    split_key as split_key,
    timestep_embedding as timestep_embedding,
    zero_linear as zero_linear,
)


class MultiheadAttention(eqx.Module):
    """Multi-head dot-product attention of ``n`` query tokens over ``m`` key/value tokens.

    Self-attention when no ``context`` is given, cross-attention otherwise. With ``locality`` it
    is Locality Self-Attention: the scale ``exp(log_temperature)`` is learned (initialised to
    ``head_dim ** -0.5``) and each token's attention to itself is masked out.
    """

    to_q: eqx.nn.Linear
    to_kv: eqx.nn.Linear
    to_out: eqx.nn.Linear
    log_temperature: Float[Array, ""] | None
    dropout: eqx.nn.Dropout
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        locality: bool = False,
        dropout: float = 0.0,
        weight_init: Initializer | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `dim`: width of the query tokens and of the output.
        - `num_heads`, `head_dim`: the heads and the width of each.
        - `context_dim`: width of the key/value tokens (defaults to `dim`).
        - `qkv_bias`: biases on the query/key/value projections.
        - `locality`: Locality Self-Attention (learned temperature, masked diagonal).
        - `dropout`: dropout on the output projection.
        - `weight_init`: initializer of all projections (PyTorch's default when None).
        - `key`: initialisation randomness.
        """
        q_key, kv_key, out_key = jax.random.split(key, 3)
        inner = num_heads * head_dim
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = make_linear(dim, inner, use_bias=qkv_bias, weight_init=weight_init, key=q_key)
        self.to_kv = make_linear(
            kv_dim, 2 * inner, use_bias=qkv_bias, weight_init=weight_init, key=kv_key
        )
        self.to_out = make_linear(inner, dim, weight_init=weight_init, key=out_key)
        self.log_temperature = jnp.log(jnp.asarray(head_dim**-0.5)) if locality else None
        self.dropout = eqx.nn.Dropout(dropout)
        self.num_heads = num_heads
        self.head_dim = head_dim

    def __call__(
        self,
        x: Float[Array, "n d"],
        context: Float[Array, "m e"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "n d"], Float[Array, "heads n m"]]:
        """Attend from ``x`` to ``context`` (to ``x`` itself when None).

        **Arguments:**
        - `x`: the query tokens.
        - `context`: the key/value tokens; None for self-attention.
        - `key`: dropout randomness.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the output tokens and the attention weights (rows sum to one).
        """
        source = x if context is None else context
        q = apply_tokens(self.to_q, x).reshape(x.shape[0], self.num_heads, self.head_dim)
        kv = apply_tokens(self.to_kv, source).reshape(source.shape[0], 2, self.num_heads, -1)
        k, v = kv[:, 0], kv[:, 1]
        if self.log_temperature is None:
            scale = jnp.asarray(self.head_dim**-0.5, dtype=x.dtype)
        else:
            scale = jnp.exp(self.log_temperature)
        # Heads-major operands: batched matmuls in the layout XLA:CPU runs fastest.
        q, k, v = (jnp.swapaxes(z, 0, 1) for z in (q, k, v))
        logits = jnp.einsum("hnd,hmd->hnm", q, k) * scale
        if self.log_temperature is not None:
            if context is not None:
                raise ValueError("Locality Self-Attention is self-attention: pass no context.")
            diagonal = jnp.eye(x.shape[0], dtype=bool)
            logits = jnp.where(diagonal, jnp.finfo(logits.dtype).min, logits)
        # The softmax runs in float32 whatever the compute dtype, then returns to it.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.swapaxes(jnp.einsum("hnm,hmd->hnd", weights, v), 0, 1).reshape(x.shape[0], -1)
        out = self.dropout(apply_tokens(self.to_out, out), key=key, inference=inference)
        return out, weights


class TransformerTrace(NamedTuple):
    """A transformer's output together with intermediates of the same forward pass.

    For a `TransformerBlock` the fields are those of one block; a `Transformer` stacks the last
    three along a leading `depth` axis.
    """

    tokens: Array
    """The output tokens, `(n, d)`."""
    attention: Array
    """The attention weights, `(heads, n, n)` (rows sum to one)."""
    attn_out: Array
    """The attention branch added to the residual stream, `(n, d)`."""
    mlp_out: Array
    """The MLP branch added to the residual stream, `(n, d)`."""


class TransformerBlock(eqx.Module):
    """A pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    norm1: eqx.nn.LayerNorm
    attention: MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: MLP

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        head_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        locality: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:** width, heads, head width, MLP width, dropout, Locality Self-Attention
        switch and initialisation key, as in `MultiheadAttention` and `MLP`."""
        attn_key, mlp_key = jax.random.split(key)
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.attention = MultiheadAttention(
            dim,
            num_heads=num_heads,
            head_dim=head_dim,
            locality=locality,
            dropout=dropout,
            key=attn_key,
        )
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout=dropout, key=mlp_key)

    def trace(
        self,
        x: Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> TransformerTrace:
        """Apply the block and keep its residual branches (for instrumentation).

        **Arguments:**
        - `x`: the input tokens.
        - `key`: dropout randomness.
        - `inference`: disables dropout; None leaves it to `eqx.nn.inference_mode`.

        **Returns:** the output tokens, attention weights, attention branch and MLP branch.
        """
        attn_key, mlp_key = split_key(key, 2)
        h, weights = self.attention(apply_tokens(self.norm1, x), key=attn_key, inference=inference)
        x = x + h
        m = self.mlp(apply_tokens(self.norm2, x), key=mlp_key, inference=inference)
        return TransformerTrace(x + m, weights, h, m)

    def __call__(
        self,
        x: Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "n d"], Float[Array, "heads n n"]]:
        """Apply the block; returns the tokens and the attention weights."""
        out = self.trace(x, key=key, inference=inference)
        return out.tokens, out.attention


class Transformer(eqx.Module):
    """A stack of pre-norm transformer blocks."""

    blocks: tuple[TransformerBlock, ...]

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        head_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        locality: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `depth` blocks of `TransformerBlock` with the given sizes."""
        self.blocks = tuple(
            TransformerBlock(
                dim,
                num_heads=num_heads,
                head_dim=head_dim,
                mlp_dim=mlp_dim,
                dropout=dropout,
                locality=locality,
                key=k,
            )
            for k in jax.random.split(key, depth)
        )

    def trace(
        self,
        x: Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> TransformerTrace:
        """Apply every block and keep their residual branches; arguments as for
        `TransformerBlock.trace`.

        **Returns:** the output tokens, and the attention weights `(depth, heads, n, n)`, attention
        branches `(depth, n, d)` and MLP branches `(depth, n, d)` of the blocks in order.
        """
        traces: list[TransformerTrace] = []
        for block, block_key in zip(self.blocks, split_key(key, len(self.blocks)), strict=True):
            traces.append(block.trace(x, key=block_key, inference=inference))
            x = traces[-1].tokens
        return TransformerTrace(
            x,
            jnp.stack([tr.attention for tr in traces]),
            jnp.stack([tr.attn_out for tr in traces]),
            jnp.stack([tr.mlp_out for tr in traces]),
        )

    def __call__(
        self,
        x: Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "n d"], Float[Array, "depth heads n n"]]:
        """Apply every block; returns the tokens and the stacked attention weights."""
        out = self.trace(x, key=key, inference=inference)
        return out.tokens, out.attention
