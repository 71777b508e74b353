"""DiT: adaLN-Zero at initialisation, embeddings against numpy, conditioning modes, sizes."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from fsdm_eqx.config import ModelConfig
from fsdm_eqx.nn.dit import (
    DIT_SIZES,
    DiT,
    patchify_channels_first,
    sincos_position_embedding,
    unpatchify,
)

SIZE, CH, HIDDEN, DEPTH, HEADS, CTX = 8, 3, 16, 2, 2, 12


def _dit(conditioning="film", gate_bias=0.0, out_channels=2 * CH):
    return DiT(
        image_size=SIZE,
        in_channels=CH,
        out_channels=out_channels,
        patch_size=2,
        hidden=HIDDEN,
        depth=DEPTH,
        num_heads=HEADS,
        context_dim=CTX,
        conditioning=conditioning,
        gate_bias=gate_bias,
        key=jax.random.key(0),
    )


def _inputs(conditioning):
    x = jax.random.normal(jax.random.key(1), (CH, SIZE, SIZE))
    shape = (CTX,) if conditioning == "film" else (5, CTX)
    return x, jnp.asarray(417.0), jax.random.normal(jax.random.key(2), shape)


@pytest.mark.parametrize("conditioning", ["film", "lag"])
def test_adaln_zero_blocks_are_identity_and_output_is_zero(conditioning):
    dit = _dit(conditioning)
    x, t, ctx = _inputs(conditioning)

    @eqx.filter_jit
    def run(dit, x, t, ctx):
        tokens, c, ctx_tokens = dit.embed(x, t, ctx)
        outs = [block(tokens, c, ctx_tokens) for block in dit.blocks]
        return tokens, outs, dit(x, t, ctx)

    tokens, outs, y = run(dit, x, t, ctx)
    assert np.abs(np.asarray(tokens)).max() > 0
    for out in outs:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(tokens))
    assert y.shape == (2 * CH, SIZE, SIZE) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_gate_bias_warm_start_makes_blocks_act():
    dit = _dit("film", gate_bias=0.5)
    x, t, ctx = _inputs("film")
    tokens, c, _ = dit.embed(x, t, ctx)
    out = dit.blocks[0](tokens, c)
    assert not np.allclose(np.asarray(out), np.asarray(tokens))


@pytest.mark.parametrize("conditioning", ["film", "lag"])
def test_warm_start_lets_the_context_act_at_initialisation(conditioning):
    x, t, ctx = _inputs(conditioning)

    def context_gradient(dit):
        return jax.grad(lambda c: jnp.sum(dit(x, t, c) ** 2) + jnp.sum(dit(x, t, c)))(ctx)

    warm = np.asarray(context_gradient(_dit(conditioning, gate_bias=0.5)))
    zero = np.asarray(context_gradient(_dit(conditioning)))
    assert np.abs(warm).max() > 1e-6  # d output / d context is non-zero at step 0
    np.testing.assert_array_equal(zero, 0.0)  # adaLN-Zero: the output is zero, whatever c


def test_conditioning_shapes_are_checked(getkey):
    x, t, ctx = _inputs("film")
    with pytest.raises(ValueError, match="LAG conditioning takes context tokens"):
        _dit("lag")(x, t, ctx)
    with pytest.raises(ValueError, match="FiLM conditioning takes one context vector"):
        _dit("film")(x, t, jnp.zeros((4, CTX)))
    with pytest.raises(jaxtyping.TypeCheckError):
        _dit("film")(x[0], t, ctx)
    with pytest.raises(ValueError, match="does not divide"):
        DiT(image_size=9, patch_size=2, context_dim=4, key=getkey())


def test_sincos_matches_formula():
    dim, grid = 8, 3
    emb = sincos_position_embedding(dim, grid)
    assert emb.shape == (grid * grid, dim)
    for idx in range(grid * grid):
        row, col = divmod(idx, grid)
        ref = []
        for pos in (row, col):
            freqs = [10000 ** (-k / (dim // 4)) for k in range(dim // 4)]
            ref += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
        np.testing.assert_allclose(emb[idx], ref, rtol=1e-6, atol=1e-6)


def test_unpatchify_inverts_patchify():
    x = jnp.arange(CH * SIZE * SIZE, dtype=jnp.float32).reshape(CH, SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify_channels_first(x, 2), 2, CH)), x)


def test_parameter_count_matches_closed_form():
    dit = _dit("lag", out_channels=CH)
    d, p = HIDDEN, 2
    block = (4 * d * d + 4 * d) + (8 * d * d + 5 * d) + (6 * d * d + 6 * d)
    cross = 4 * d * d + 4 * d
    expected = (
        (p * p * CH * d + d)
        + (256 * d + d + d * d + d)
        + (CTX * d + d)
        + DEPTH * (block + cross)
        + (2 * d * d + 2 * d + d * p * p * CH + p * p * CH)
    )
    leaves = jax.tree.leaves(eqx.filter(dit, eqx.is_inexact_array))
    assert sum(leaf.size for leaf in leaves) == expected


def test_named_sizes_agree_with_config():
    for name, dims in DIT_SIZES.items():
        assert ModelConfig(dit_size=name).dit_dims == dims
    assert DIT_SIZES["S"] == (384, 12, 6) and DIT_SIZES["B"] == (768, 12, 12)
    assert ModelConfig(dit_size="S", dit_depth=4).dit_dims == (384, 4, 6)


def _perturbed(dit):
    """The DiT with every floating-point array replaced by noise (drawn in numpy, so that it
    compiles nothing), so no vector is zero."""
    rng = np.random.default_rng(7)
    leaves, treedef = jax.tree_util.tree_flatten(dit)
    leaves = [
        jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) if eqx.is_inexact_array(x) else x
        for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _np_linear(layer, x):
    return np.asarray(layer.weight, np.float64) @ x + np.asarray(layer.bias, np.float64)


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_timestep(t, dim):
    half = dim // 2
    args = t * np.exp(-np.log(10000.0) * np.arange(half) / half)
    return np.concatenate([np.cos(args), np.sin(args)])


def _rms(v):
    return np.sqrt(np.mean(np.square(v)))


@pytest.mark.parametrize("conditioning", ["film", "lag"])
def test_modulation_matches_numpy_from_the_layer_weights(conditioning):
    dit = _perturbed(_dit(conditioning))
    _, t, ctx = _inputs(conditioning)
    got = {k: float(v) for k, v in eqx.filter_jit(dit.modulation)(t, ctx).items()}
    emb = _np_timestep(float(t), dit.t_embedder.frequency_dim)
    c = _np_linear(dit.t_embedder.fc2, _np_silu(_np_linear(dit.t_embedder.fc1, emb)))
    if conditioning == "film":
        c = c + _np_linear(dit.context_proj, np.asarray(ctx, np.float64))
    expected = {}
    parts = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
    for i, block in enumerate(dit.blocks):
        vectors = np.split(_np_linear(block.modulation, _np_silu(c)), 6)
        expected.update({f"block{i}/{p}": _rms(v) for p, v in zip(parts, vectors, strict=True)})
    shift, scale = np.split(_np_linear(dit.final.modulation, _np_silu(c)), 2)
    expected.update({"final/shift": _rms(shift), "final/scale": _rms(scale)})
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert value > 0.01
        assert got[name] == pytest.approx(value, rel=1e-4), name


def test_modulation_at_init_gates_are_zero_or_the_gate_bias():
    x, t, ctx = _inputs("film")
    del x
    zero = _dit("film").modulation(t, ctx)
    warm = _dit("film", gate_bias=0.5).modulation(t, ctx)
    for i in range(DEPTH):
        for part in ("gate_msa", "gate_mlp"):
            assert float(zero[f"block{i}/{part}"]) == 0.0
            assert float(warm[f"block{i}/{part}"]) == pytest.approx(0.5, rel=0.1)
        assert float(zero[f"block{i}/shift_msa"]) == 0.0  # adaLN-Zero: the weights are zero
        assert 0.0 < float(warm[f"block{i}/shift_msa"]) < 0.1  # warm start: small, not zero
    assert float(zero["final/scale"]) == 0.0
