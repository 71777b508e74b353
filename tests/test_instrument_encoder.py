"""The encoder's internals and the context saliency against independent references.

One tiny FSDM (8x8 RGB images, 2x2 patches per image, sets of 3) is shared by the module so that
each jitted function compiles once; its widths agree so that initialisation compiles few shapes.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import matplotlib
import numpy as np
import pytest

from fsdm_eqx.config import ModelConfig
from fsdm_eqx.instrument import (
    Visuals,
    activation_stats,
    attention_maps,
    attention_rollout,
    collect_visuals,
    context_saliency,
    maps_figure,
    parameter_histograms,
    position_similarity,
    position_similarity_image,
    rollout_matrix,
)
from fsdm_eqx.instrument.encoder import _encoder_views, _saliency_maps
from fsdm_eqx.nn import FSDM, SetTokenEncoder

CONFIG = ModelConfig(
    hdim=8,
    encoder_depth=2,
    encoder_heads=2,
    encoder_head_dim=4,
    encoder_mlp_dim=32,
    encoder_patch_size=4,
    dit_size=None,
    dit_hidden=8,
    dit_depth=1,
    dit_heads=2,
    dit_patch_size=4,
    image_size=8,
    channels=3,
    ns=3,
)
GRID = 2  # patches per side
LAYERS, HEADS = (1, 0), (1,)


@pytest.fixture(scope="module")
def model():
    return FSDM(CONFIG, key=jax.random.key(0))


@pytest.fixture(scope="module")
def x_sets():
    return jax.random.uniform(jax.random.key(1), (2, 3, 3, 8, 8), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def time_encoder():
    """An sViT (Locality Self-Attention) with a timestep token: two tokens before the patches."""
    return SetTokenEncoder(
        image_size=8,
        channels=3,
        set_size=3,
        patch_size=4,
        dim=8,
        depth=2,
        num_heads=2,
        head_dim=4,
        mlp_dim=32,
        hdim=8,
        time_token=True,
        time_dim=8,
        key=jax.random.key(2),
    )


@eqx.filter_jit
def _encode(encoder, x_set, t=None):
    return encoder.encode(x_set, t, inference=True)


def _numpy_rollout(weights: np.ndarray) -> np.ndarray:
    """Abnar & Zuidema (2020): A_l = 0.5 W_l + 0.5 I (W_l the head mean), A~_l = A_l A~_{l-1}."""
    weights = weights.astype(np.float64)
    n = weights.shape[-1]
    rollout = np.eye(n)
    for layer in weights:
        rollout = (0.5 * layer.mean(axis=0) + 0.5 * np.eye(n)) @ rollout
    return rollout


def test_attention_maps_are_the_class_token_rows_of_encode(model, x_sets):
    x_set = x_sets[0]
    maps = attention_maps(model.encoder, x_set, layers=LAYERS, heads=HEADS)
    assert maps.shape == (2, 1, 3, GRID, GRID)
    weights = np.asarray(_encode(model.encoder, x_set)[1])
    for a, layer in enumerate(LAYERS):
        for b, head in enumerate(HEADS):
            for j in range(3):
                for r in range(GRID):
                    for c in range(GRID):
                        token = 1 + j * GRID * GRID + r * GRID + c
                        expected = weights[layer, head, 0, token]
                        assert maps[a, b, j, r, c] == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("which", ["vit", "svit_time_token"])
def test_rollout_matches_the_papers_equation(which, model, x_sets, time_encoder):
    x_set = x_sets[1]
    if which == "vit":
        encoder, t, special = model.encoder, None, 1
        _, weights = _encode(encoder, x_set)
    else:
        encoder, t, special = time_encoder, 7.0, 2
        _, weights = _encode(encoder, x_set, jnp.asarray(t))
    reference = _numpy_rollout(np.asarray(weights))
    np.testing.assert_allclose(np.asarray(rollout_matrix(weights)), reference, rtol=1e-5, atol=1e-6)
    rollout = attention_rollout(encoder, x_set, t=t)
    expected = reference[0, special:].reshape(encoder.token_groups(3), GRID, GRID)
    np.testing.assert_allclose(rollout, expected, rtol=1e-5, atol=1e-6)


def _manual_branches(encoder, x_set):
    """Each block's attention and MLP branch, rebuilt from the encoder's layers."""
    trunk = encoder.trunk
    patches = encoder.patch_tokens(x_set)
    m, p, dim = patches.shape
    position = jnp.concatenate([trunk.position[:1], jnp.tile(trunk.position[1:], (m, 1))])
    h = jnp.concatenate([trunk.cls_token[None], patches.reshape(m * p, dim)]) + position
    branches = []
    for block in trunk.transformer.blocks:
        attn = block.attention(jax.vmap(block.norm1)(h))[0]
        mlp = block.mlp(jax.vmap(block.norm2)(h + attn))
        branches.append((np.asarray(attn, np.float64), np.asarray(mlp, np.float64)))
        h = h + attn + mlp
    return branches


def test_activation_stats_match_a_manual_recomputation(model, x_sets):
    stats = activation_stats(model.encoder, x_sets[0])
    assert len(stats) == 4 * CONFIG.encoder_depth
    for block, (attn, mlp) in enumerate(_manual_branches(model.encoder, x_sets[0])):
        prefix = f"encoder/block{block}/"
        assert stats[prefix + "attn_mean"] == pytest.approx(attn.mean(), rel=1e-4, abs=1e-6)
        assert stats[prefix + "attn_std"] == pytest.approx(attn.std(), rel=1e-4)
        assert stats[prefix + "mlp_mean"] == pytest.approx(mlp.mean(), rel=1e-4, abs=1e-6)
        assert stats[prefix + "mlp_std"] == pytest.approx(mlp.std(), rel=1e-4)


def test_position_similarity_and_its_heat_map(time_encoder):
    similarity = position_similarity(time_encoder)
    position = np.asarray(time_encoder.trunk.position, np.float64)[2:]
    unit = position / np.linalg.norm(position, axis=1, keepdims=True)
    np.testing.assert_allclose(similarity, unit @ unit.T, rtol=1e-5, atol=1e-6)
    image = position_similarity_image(time_encoder, scale=3)
    cell = GRID * 3 + 2
    assert image.shape == (GRID * cell, GRID * cell, 3) and image.dtype == np.uint8
    lut = matplotlib.colormaps["viridis"]
    for i in range(GRID * GRID):
        tile = image[(i // GRID) * cell + 1 :, (i % GRID) * cell + 1 :]
        for j in range(GRID * GRID):
            y, x = 3 * (j // GRID), 3 * (j % GRID)
            colour = lut((float(similarity[i, j]) + 1.0) / 2.0, bytes=True)[:3]
            assert np.all(tile[y : y + 3, x : x + 3] == np.array(colour, np.uint8))
    # every position is most similar to itself
    assert np.allclose(np.diagonal(similarity), 1.0, atol=1e-6)


@eqx.filter_jit
def _finite_differences(model, x_set, projection, eps):
    """Central differences of f(X) = |c|^2 and of f(X) = <r, c> along every pixel of every image."""

    def f(x):
        c = model.context(x, inference=True).c
        return jnp.stack([jnp.sum(jnp.square(c)), jnp.sum(projection * c)])

    basis = jnp.eye(x_set.size, dtype=x_set.dtype).reshape(-1, *x_set.shape) * eps
    plus = jax.lax.map(lambda d: f(x_set + d), basis, batch_size=96)
    minus = jax.lax.map(lambda d: f(x_set - d), basis, batch_size=96)
    return ((plus - minus) / (2 * eps)).T.reshape(2, *x_set.shape)


def test_context_saliency_matches_finite_differences(model, x_sets, getkey):
    x_set = x_sets[0]
    key = getkey()
    projection = jax.random.normal(key, model.context(x_set, inference=True).c.shape)
    grads = np.asarray(_finite_differences(model, x_set, projection, 1e-2), np.float64)
    for grad, saliency_key in zip(grads, (None, key), strict=True):
        saliency = context_saliency(model, x_set, key=saliency_key)
        assert saliency.shape == (3, 8, 8)
        reference = np.sqrt(np.sum(grad**2, axis=1))
        assert reference.max() > 0
        np.testing.assert_allclose(saliency, reference, rtol=3e-2, atol=3e-3 * reference.max())


def test_parameter_histograms_per_subtree(model):
    hist = parameter_histograms(model, "params")
    subtrees = ("encoder", "posterior", "denoiser", "null_context")
    assert set(hist) == {f"params/{name}" for name in subtrees}
    for name in subtrees:
        leaves = [
            np.ravel(x)
            for x in jax.tree_util.tree_leaves(getattr(model, name))
            if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
        ]
        np.testing.assert_array_equal(hist[f"params/{name}"], np.concatenate(leaves))
    full = hist["params/denoiser"]
    small = parameter_histograms(model, "grads", max_values=100)["grads/denoiser"]
    stride = -(-full.size // 100)
    assert small.size <= 100
    np.testing.assert_array_equal(small, full[::stride])


def test_collect_visuals_on_fixed_sets(model, x_sets):
    grads = jax.tree_util.tree_map(lambda x: 2 * x if isinstance(x, jax.Array) else x, model)
    visuals = collect_visuals(model, x_sets, layers=LAYERS, heads=HEADS, key=None, grads=grads)
    assert isinstance(visuals, Visuals)
    expected = {"encoder/position_similarity"}
    for i in range(2):
        expected |= {f"encoder/rollout_set{i}", f"encoder/saliency_set{i}"}
        expected |= {f"encoder/attention_layer{la}_head{h}_set{i}" for la in LAYERS for h in HEADS}
    assert set(visuals.images) == expected
    assert all(im.dtype == np.uint8 and im.ndim == 3 for im in visuals.images.values())
    assert set(visuals.histograms) == {
        f"{kind}/{name}"
        for kind in ("params", "grads")
        for name in ("encoder", "posterior", "denoiser", "null_context")
    }
    np.testing.assert_allclose(
        visuals.histograms["grads/encoder"], 2 * visuals.histograms["params/encoder"]
    )

    # the batched passes give each set what the one-set functions give it
    views = _encoder_views(model.encoder, x_sets, None)
    saliency = _saliency_maps(model, x_sets, None, None)
    for i in range(2):
        single = attention_maps(model.encoder, x_sets[i], layers=LAYERS, heads=HEADS)
        chosen = np.asarray(views["attention"][i])[list(LAYERS)][:, list(HEADS)]
        np.testing.assert_allclose(chosen, single, rtol=1e-5, atol=1e-7)
        rollout = attention_rollout(model.encoder, x_sets[i])
        np.testing.assert_allclose(np.asarray(views["rollout"][i]), rollout, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            saliency[i], context_saliency(model, x_sets[i]), rtol=1e-4, atol=1e-7
        )
        np.testing.assert_array_equal(
            visuals.images[f"encoder/saliency_set{i}"],
            maps_figure(x_sets[i], saliency[i], cmap="magma"),
        )
        np.testing.assert_array_equal(
            visuals.images[f"encoder/attention_layer1_head1_set{i}"],
            maps_figure(x_sets[i], np.asarray(views["attention"][i, 1, 1])),
        )

    # activation statistics pool the branches of all sets
    branches = [_manual_branches(model.encoder, x) for x in x_sets]
    for block in range(CONFIG.encoder_depth):
        for k, part in enumerate(("attn", "mlp")):
            values = np.stack([b[block][k] for b in branches])
            mean = visuals.scalars[f"encoder/block{block}/{part}_mean"]
            std = visuals.scalars[f"encoder/block{block}/{part}_std"]
            assert mean == pytest.approx(values.mean(), rel=1e-4, abs=1e-6)
            assert std == pytest.approx(values.std(), rel=1e-4)


def test_bad_inputs_are_named(model, x_sets, time_encoder):
    with pytest.raises(ValueError, match=r"layers=\[2\]"):
        attention_maps(model.encoder, x_sets[0], layers=[2], heads=[0])
    with pytest.raises(ValueError, match="heads"):
        attention_maps(model.encoder, x_sets[0], layers=[0], heads=[])
    with pytest.raises(ValueError, match="one set of images"):
        attention_rollout(model.encoder, jnp.zeros((3, 3, 12, 12)))
    with pytest.raises(ValueError, match="timestep token"):
        attention_rollout(time_encoder, x_sets[0])
    with pytest.raises(ValueError, match=r"\(c, h, w\) = \(3, 8, 8\)"):
        context_saliency(model, jnp.zeros((3, 1, 8, 8)))
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        collect_visuals(model, x_sets[0], layers=[0], heads=[0], key=None)
    with pytest.raises(ValueError, match="max_values"):
        parameter_histograms(model, "params", max_values=0)
