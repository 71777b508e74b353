"""Attention, MLP and embeddings against plain numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.nn.attention import MultiheadAttention, Transformer
from fsdm_eqx.nn.layers import timestep_embedding


def _numpy_attention(attn: MultiheadAttention, x: np.ndarray, ctx: np.ndarray, scale: float):
    def lin(layer, v):
        w = np.asarray(layer.weight, np.float64)
        b = 0.0 if layer.bias is None else np.asarray(layer.bias, np.float64)
        return v @ w.T + b

    h, d = attn.num_heads, attn.head_dim
    q = lin(attn.to_q, x).reshape(len(x), h, d)
    kv = lin(attn.to_kv, ctx).reshape(len(ctx), 2, h, d)
    k, v = kv[:, 0], kv[:, 1]
    out = np.zeros((len(x), h, d))
    weights = np.zeros((h, len(x), len(ctx)))
    for head in range(h):
        logits = q[:, head] @ k[:, head].T * scale
        if attn.log_temperature is not None:
            np.fill_diagonal(logits, -np.inf)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights[head] = e / e.sum(axis=1, keepdims=True)
        out[:, head] = weights[head] @ v[:, head]
    return lin(attn.to_out, out.reshape(len(x), h * d)), weights


@pytest.mark.parametrize("mode", ["self", "cross", "locality"])
def test_attention_matches_numpy(mode, getkey):
    key = getkey()
    x = np.asarray(jax.random.normal(getkey(), (5, 12)), np.float64)
    ctx = np.asarray(jax.random.normal(getkey(), (7, 6)), np.float64)
    attn = MultiheadAttention(
        12,
        num_heads=3,
        head_dim=4,
        context_dim=6 if mode == "cross" else None,
        qkv_bias=mode == "cross",
        locality=mode == "locality",
        key=key,
    )
    context = jnp.asarray(ctx, jnp.float32) if mode == "cross" else None
    out, weights = attn(jnp.asarray(x, jnp.float32), context)
    ref_out, ref_w = _numpy_attention(attn, x, ctx if mode == "cross" else x, 4**-0.5)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-4, atol=1e-6)
    if mode == "locality":
        assert np.all(np.diagonal(np.asarray(weights), axis1=1, axis2=2) == 0.0)


def test_locality_rejects_context(getkey):
    attn = MultiheadAttention(8, num_heads=2, head_dim=4, locality=True, key=getkey())
    with pytest.raises(ValueError, match="self-attention"):
        attn(jnp.zeros((3, 8)), jnp.zeros((3, 8)))


def test_transformer_returns_weights_of_every_layer(getkey):
    tr = Transformer(8, depth=3, num_heads=2, head_dim=4, mlp_dim=16, key=getkey())
    x = jax.random.normal(getkey(), (5, 8))
    out, weights = tr(x)
    assert out.shape == (5, 8)
    assert weights.shape == (3, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)


def test_dropout_needs_key_only_in_training(getkey):
    tr = Transformer(8, depth=1, num_heads=2, head_dim=4, mlp_dim=16, dropout=0.5, key=getkey())
    x = jax.random.normal(getkey(), (5, 8))
    a, _ = tr(x, inference=True)
    b, _ = tr(x, inference=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c, _ = tr(x, key=getkey())
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(RuntimeError, match="key"):
        tr(x)


@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_matches_formula(dim):
    t = 37.5
    emb = np.asarray(timestep_embedding(jnp.asarray(t), dim))
    half = dim // 2
    ref = []
    for k in range(half):
        ref.append(math.cos(t * 10000 ** (-k / half)))
    for k in range(half):
        ref.append(math.sin(t * 10000 ** (-k / half)))
    if dim % 2:
        ref.append(0.0)
    np.testing.assert_allclose(emb, np.array(ref), rtol=1e-5, atol=1e-5)


def test_trace_keeps_the_residual_branches_of_the_same_forward(getkey):
    tr = Transformer(8, depth=2, num_heads=2, head_dim=4, mlp_dim=16, key=getkey())
    x = jax.random.normal(getkey(), (5, 8))
    out = tr.trace(x, inference=True)
    tokens, weights = tr(x, inference=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(out.attention), np.asarray(weights))
    assert out.attn_out.shape == out.mlp_out.shape == (2, 5, 8)
    # each block adds its two branches to the residual stream, computed from its own layers
    h = x
    for i, block in enumerate(tr.blocks):
        attn = block.attention(jax.vmap(block.norm1)(h))[0]
        np.testing.assert_allclose(np.asarray(out.attn_out[i]), np.asarray(attn), atol=1e-6)
        mlp = block.mlp(jax.vmap(block.norm2)(h + attn))
        np.testing.assert_allclose(np.asarray(out.mlp_out[i]), np.asarray(mlp), atol=1e-6)
        h = h + attn + mlp
    np.testing.assert_allclose(np.asarray(out.tokens), np.asarray(h), atol=1e-5)
