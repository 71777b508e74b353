"""Set encoders: shapes, pooling, permutation invariance, timestep token, Shifted Patch Tokens."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from fsdm_eqx.nn import ImageTokenEncoder, SetTokenEncoder, SetViTEncoder, ViTSetEncoder
from fsdm_eqx.nn.layers import patchify, timestep_embedding
from fsdm_eqx.nn.vit import POOLINGS, encoder_attention_layout, shifted_patch_input

SIZE, CH, PATCH, HDIM = 8, 3, 4, 16


def _encoder(kind, pooling, *, time_token=False, dropout=0.0, seed=0):
    cls = ImageTokenEncoder if kind == "vit" else functools.partial(SetTokenEncoder, set_size=3)
    return cls(
        image_size=SIZE,
        channels=CH,
        patch_size=PATCH,
        dim=12,
        depth=2,
        num_heads=2,
        head_dim=6,
        mlp_dim=24,
        hdim=HDIM,
        pooling=pooling,
        dropout=dropout,
        time_token=time_token,
        time_dim=8,
        key=jax.random.key(seed),
    )


@pytest.fixture(scope="module")
def x_set():
    return jax.random.uniform(jax.random.key(7), (3, CH, SIZE, SIZE), minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("kind", ["vit", "svit"])
def test_pooling_shapes_and_permutation_invariance(kind, x_set):
    """The ViT is invariant to the order of the set (`none`, which keeps every image's tokens,
    permutes them with the images); the sViT, which stacks the set, is not."""
    perm = np.array([2, 0, 1])
    m, p = x_set.shape[0], (SIZE // PATCH) ** 2
    for pooling in POOLINGS:
        enc = _encoder(kind, pooling)
        out, weights = enc.encode(x_set, inference=True)
        groups = 1 if kind == "svit" or pooling == "agg" else m
        n = 1 + groups * p  # the class token, then the patch grids the transformer reads
        expected = {"mean_patch": (p, HDIM), "agg": (n, HDIM), "none": (n, HDIM)}
        assert out.shape == expected.get(pooling, (HDIM,)) and out.dtype == jnp.float32
        assert enc.token_groups(m) == groups
        assert weights.shape == (2, 2, n, n)
        permuted = np.asarray(enc(x_set[perm], inference=True))
        out = np.asarray(out)
        if kind == "vit" and pooling == "none":
            out = np.concatenate([out[:1], out[1:].reshape(m, p, HDIM)[perm].reshape(m * p, -1)])
        if kind == "vit":
            np.testing.assert_allclose(permuted, out, rtol=1e-5, atol=1e-5)
        else:
            assert not np.allclose(permuted, out, rtol=1e-3, atol=1e-3)


def _transformer_by_hand(enc, patches, t=None):
    """The trunk's forward on patch tokens ``(g, p, dim)`` from its parts: class (and timestep)
    token, positions repeated per grid, the transformer, then LayerNorm + linear on every token."""
    trunk = enc.trunk
    special = [trunk.cls_token]
    if t is not None:
        special.append(trunk.time_proj(timestep_embedding(t, trunk.time_dim)))
    k, (g, p, dim) = len(special), patches.shape
    tokens = jnp.concatenate([jnp.stack(special), patches.reshape(g * p, dim)])
    tokens = tokens + jnp.concatenate([trunk.position[:k], jnp.tile(trunk.position[k:], (g, 1))])
    out, _ = trunk.transformer(tokens, inference=True)
    return jax.vmap(lambda z: trunk.head(trunk.head_norm(z)))(out)


@pytest.mark.parametrize("time_token", [False, True])
def test_agg_is_the_transformer_on_each_positions_mean(x_set, time_token):
    """`agg`: the transformer reads the mean over the set of each patch position's embedding
    (not the reference's reshape, which mixes positions); every output token is the context."""
    enc = _encoder("vit", "agg", time_token=time_token)
    t = jnp.asarray(7.0) if time_token else None
    embedded = np.stack([np.asarray(enc.patch_tokens(x[None]))[0] for x in x_set])  # (m, p, dim)
    mean = jnp.asarray(embedded.mean(axis=0, keepdims=True))
    expected = np.asarray(_transformer_by_hand(enc, mean, t))
    out = np.asarray(enc(x_set, t, inference=True))
    assert out.shape == ((2 if time_token else 1) + (SIZE // PATCH) ** 2, HDIM)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # as many tokens for any set size
    assert enc(x_set[:1], t, inference=True).shape == out.shape


@pytest.mark.parametrize("time_token", [False, True])
def test_none_keeps_every_token(x_set, time_token):
    """`none`: the special tokens and every image's patches, (k + m p) tokens for m images."""
    enc = _encoder("vit", "none", time_token=time_token)
    t = jnp.asarray(7.0) if time_token else None
    k, p = (2 if time_token else 1), (SIZE // PATCH) ** 2
    for m in (1, 2, 3):
        assert enc(x_set[:m], t, inference=True).shape == (k + m * p, HDIM)
    expected = np.asarray(_transformer_by_hand(enc, enc.patch_tokens(x_set), t))
    np.testing.assert_allclose(
        np.asarray(enc(x_set, t, inference=True)), expected, rtol=1e-5, atol=1e-5
    )


def test_svit_tokens_stack_the_set_on_channels_as_the_reference():
    """One token per patch position: LayerNorm + linear of the patch of the channel-stacked set
    (channel-major, as the reference's SPT) and of its four diagonal shifts, built in numpy."""
    enc = _encoder("svit", "mean")
    x = np.random.default_rng(0).uniform(-1, 1, (3, CH, SIZE, SIZE)).astype(np.float32)
    tokens = np.asarray(enc.patch_tokens(jnp.asarray(x)))
    grid = SIZE // PATCH
    assert tokens.shape == (1, grid * grid, 12)
    stacked = x.transpose(1, 0, 2, 3).reshape(CH * 3, SIZE, SIZE)  # channel c, image i -> c*3+i
    shift = PATCH // 2
    padded = np.pad(stacked, ((0, 0), (shift, shift), (shift, shift)))
    views = [stacked] + [
        padded[:, shift + dy : shift + dy + SIZE, shift + dx : shift + dx + SIZE]
        for dy, dx in ((-shift, -shift), (-shift, shift), (shift, -shift), (shift, shift))
    ]
    full = np.concatenate(views)
    weight, bias = np.asarray(enc.patch_embed.weight), np.asarray(enc.patch_embed.bias)
    gamma, beta = np.asarray(enc.patch_norm.weight), np.asarray(enc.patch_norm.bias)
    for r in range(grid):
        for c in range(grid):
            patch = full[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
            v = patch.transpose(1, 2, 0).reshape(-1)  # (p, p, channels), as the reference
            v = (v - v.mean()) / np.sqrt(v.var() + 1e-5) * gamma + beta
            np.testing.assert_allclose(tokens[0, r * grid + c], weight @ v + bias, atol=1e-4)


def test_svit_reads_sets_of_its_size_only(x_set, getkey):
    enc = _encoder("svit", "mean")
    with pytest.raises(ValueError, match="set_size=3"):
        enc(x_set[:2], inference=True)
    with pytest.raises(ValueError, match="set_size"):
        SetTokenEncoder(
            image_size=SIZE, channels=CH, set_size=0, patch_size=PATCH, dim=8, depth=1,
            num_heads=1, head_dim=8, mlp_dim=8, hdim=8, key=getkey(),
        )  # fmt: skip


def test_encoders_differ_only_in_tokens_and_locality():
    """Given the same options, both encoders build the same set transformer (paths and shapes of
    every parameter), but for the sViT's Locality Self-Attention temperatures; `ViTSetEncoder`
    and `SetViTEncoder` name the same classes."""
    image, stacked = _encoder("vit", "mean"), _encoder("svit", "mean")

    def parameters(trunk, *, locality):
        leaves = jax.tree_util.tree_leaves_with_path(trunk)
        named = [(jax.tree_util.keystr(path), np.shape(x)) for path, x in leaves]
        return [(name, shape) for name, shape in named if ("log_temperature" in name) == locality]

    assert parameters(image.trunk, locality=False) == parameters(stacked.trunk, locality=False)
    assert parameters(image.trunk, locality=True) == []
    assert len(parameters(stacked.trunk, locality=True)) == len(stacked.trunk.transformer.blocks)
    assert ViTSetEncoder is ImageTokenEncoder and SetViTEncoder is SetTokenEncoder


def test_trace_is_the_forward_of_encode(x_set):
    enc = _encoder("svit", "mean_patch", time_token=True)
    t = jnp.asarray(4.0)
    out = enc.trace(x_set, t, inference=True)
    context, weights = enc.encode(x_set, t, inference=True)
    np.testing.assert_array_equal(np.asarray(out.context), np.asarray(context))
    np.testing.assert_array_equal(np.asarray(out.attention), np.asarray(weights))
    n = 2 + (SIZE // PATCH) ** 2
    assert out.attn_out.shape == out.mlp_out.shape == (2, n, 12)
    assert enc.trunk.num_special == 2 and _encoder("vit", "cls").trunk.num_special == 1


def test_set_size_is_free_and_order_matters_only_within_images(x_set):
    enc = _encoder("vit", "mean")
    assert enc(x_set[:1], inference=True).shape == (HDIM,)
    assert enc(x_set, inference=True).shape == (HDIM,)
    # flipping an image changes the context: positions are per patch, not per set member
    flipped = x_set.at[0].set(x_set[0, :, ::-1])
    assert not np.allclose(np.asarray(enc(flipped, inference=True)), np.asarray(enc(x_set)))


def test_timestep_token(x_set):
    enc = _encoder("vit", "cls", time_token=True)
    a = enc(x_set, jnp.asarray(10.0), inference=True)
    b = enc(x_set, jnp.asarray(500.0), inference=True)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="timestep token"):
        enc(x_set, inference=True)
    plain = _encoder("vit", "cls")
    with pytest.raises(ValueError, match="no timestep token"):
        plain(x_set, jnp.asarray(1.0), inference=True)
    _, weights = enc.encode(x_set, jnp.asarray(3.0), inference=True)
    layout = encoder_attention_layout(3, (SIZE // PATCH) ** 2, time_token=True)
    assert weights.shape[-1] == layout.shape[0]


def test_dropout_is_used_in_training(x_set, getkey):
    enc = _encoder("svit", "mean", dropout=0.5)
    a = enc(x_set, key=getkey())
    b = enc(x_set, key=getkey())
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(enc(x_set, inference=True)), np.asarray(enc(x_set, inference=True))
    )


def test_wrong_shapes_are_rejected(x_set, getkey):
    enc = _encoder("vit", "mean")
    with pytest.raises(jaxtyping.TypeCheckError):
        enc(x_set[0], inference=True)
    with pytest.raises(ValueError, match="does not divide"):
        ImageTokenEncoder(
            image_size=10,
            channels=3,
            patch_size=4,
            dim=8,
            depth=1,
            num_heads=1,
            head_dim=8,
            mlp_dim=8,
            hdim=8,
            key=getkey(),
        )


def test_patchify_and_shifts_match_numpy():
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    patches = np.asarray(patchify(jnp.asarray(x), 2))
    # patch (row 1, col 0) flattened as (p, p, c)
    np.testing.assert_array_equal(patches[2], x[:, 2:4, 0:2].transpose(1, 2, 0).reshape(-1))
    shifted = np.asarray(shifted_patch_input(jnp.asarray(x), 1))
    assert shifted.shape == (10, 4, 4)
    np.testing.assert_array_equal(shifted[:2], x)
    for i, (dy, dx) in enumerate(((-1, -1), (-1, 1), (1, -1), (1, 1))):
        ref = np.zeros_like(x)
        for r in range(4):
            for c in range(4):
                rr, cc = r + dy, c + dx
                if 0 <= rr < 4 and 0 <= cc < 4:
                    ref[:, r, c] = x[:, rr, cc]
        np.testing.assert_array_equal(shifted[2 * (i + 1) : 2 * (i + 2)], ref)
