"""The UNet denoiser: blocks against numpy, shapes, zero output at initialisation, dropout,
conditioning, training, and the parameter count of the paper's configuration.

Compilation dominates on CPU, so the network tests share one tiny UNet per conditioning mode
(8x8 images, two levels, 32 channels) and one jitted training-mode function, ``run``, that returns
the output, a loss and its gradients with respect to the parameters and the context (compiled once
per mode); only the dropout and padding tests add inference-mode forward passes. The paper's
full-size UNet is only built abstractly (``eqx.filter_eval_shape``) to count its parameters.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxtyping import TypeCheckError
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf, softmax

from fsdm_eqx.nn.denoiser import AbstractDenoiser
from fsdm_eqx.nn.unet import (
    UNet,
    _MultiHeadAttention,
    _ResBlock,
    _SelfAttention,
    _SpatialTransformer,
)
from tests.conftest import shared_path

SIZE, C_IN, C_OUT, CTX, N_TOKENS, BATCH = 8, 3, 6, 16, 5, 2
TINY = dict(
    in_channels=C_IN,
    model_channels=32,
    out_channels=C_OUT,
    num_res_blocks=1,
    attention_resolutions=(4,),
    channel_mult=(1, 2),
    num_heads=2,
    dropout=0.1,
    context_dim=CTX,
)
PAPER = dict(
    in_channels=3,
    model_channels=64,
    out_channels=6,
    num_res_blocks=2,
    attention_resolutions=(16, 8),
    channel_mult=(1, 2, 3, 4),
    num_heads=4,
    dropout=0.2,
    context_dim=256,
    image_size=32,
)
REFERENCE_UNET_PARAMS = 23_949_702  # printed by the FSDM reference code for this configuration


# ---------------------------------------------------------------------------------------------
# helpers


def n_params(tree) -> int:
    leaves = jax.tree.leaves(tree)
    return sum(x.size for x in leaves if isinstance(x, jax.Array | jax.ShapeDtypeStruct))


def tiny(conditioning: str, image_size: int = SIZE) -> UNet:
    """The tiny test UNet; in LAG mode with attention in the middle block only, to halve the
    compile time (every attention block of the full layout is checked abstractly)."""
    kwargs = {**TINY, "attention_resolutions": ()} if conditioning == "lag" else TINY
    return UNet(**kwargs, conditioning=conditioning, image_size=image_size, key=jax.random.key(0))


def perturb(module, seed: int = 2):
    """Replace every all-zero parameter (zero-initialised layers, norm biases) by small noise.

    Done in numpy, so that it compiles nothing; the same seed gives the same values to any two
    modules with the same parameter shapes.
    """
    rng = np.random.default_rng(seed)
    params, static = eqx.partition(module, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    noisy = []
    for p in leaves:
        noise = 0.05 * rng.standard_normal(p.shape).astype(np.float32)
        noisy.append(jnp.asarray(noise) if not np.any(np.asarray(p)) else p)
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


def submodules(tree, cls) -> list:
    """Every instance of ``cls`` inside ``tree``."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, cls))
    return [n for n in nodes if isinstance(n, cls)]


def context_for(conditioning: str, seed: int) -> jax.Array:
    shape = (BATCH, CTX) if conditioning == "film" else (BATCH, N_TOKENS, CTX)
    return jax.random.normal(jax.random.key(seed), shape)


@eqx.filter_jit
def run(model, x, t, context, target, key, inference):
    """A batch through the one-example model (one dropout key per example).

    Returns the output, the loss ``mean((output[:, :C_IN] - target) ** 2)`` and its gradients
    with respect to the model's parameters and to the context.
    """
    keys = jax.random.split(key, x.shape[0])

    def loss_fn(model_and_context):
        model, context = model_and_context
        out = jax.vmap(lambda x, t, c, k: model(x, t, c, key=k, inference=inference))(
            x, t, context, keys
        )
        return jnp.mean((out[:, :C_IN] - target) ** 2), out

    (loss, out), (g_model, g_context) = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        (model, context)
    )
    return out, loss, g_model, g_context


@eqx.filter_jit
def forward(model, x, t, context, key, inference):
    """``run``'s output alone: a cheaper compilation for the tests that need no gradient."""
    if key is None:
        return jax.vmap(lambda x, t, c: model(x, t, c, inference=inference))(x, t, context)
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda x, t, c, k: model(x, t, c, key=k, inference=inference))(
        x, t, context, keys
    )


@pytest.fixture(scope="module")
def batch():
    kx, kt, ke = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (BATCH, C_IN, SIZE, SIZE))
    t = jax.random.uniform(kt, (BATCH,), maxval=1000.0)
    target = jax.random.normal(ke, (BATCH, C_IN, SIZE, SIZE))
    return x, t, target


@pytest.fixture(scope="module", params=["film", "lag"])
def pair(request):
    """(conditioning, UNet at initialisation, the same UNet with its zero layers perturbed)."""
    model = tiny(request.param)
    return request.param, model, perturb(model)


# ---------------------------------------------------------------------------------------------
# numpy references for the building blocks


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_group_norm(x, norm, eps):
    g = x.reshape(32, -1)
    g = (g - g.mean(1, keepdims=True)) / np.sqrt(g.var(1, keepdims=True) + eps)
    w, b = np.asarray(norm.weight), np.asarray(norm.bias)
    return g.reshape(x.shape) * w[:, None, None] + b[:, None, None]


def np_layer_norm(x, norm):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return y * np.asarray(norm.weight) + np.asarray(norm.bias)


def np_linear(x, layer):
    y = x @ np.asarray(layer.weight).T
    return y if layer.bias is None else y + np.asarray(layer.bias)


def np_conv(x, conv, stride=1):
    w, b = np.asarray(conv.weight), np.asarray(conv.bias)
    pad = w.shape[-1] // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, w.shape[2:], axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("chwij,ocij->ohw", win, w) + b


def np_mha(x, kv, attn, heads):
    q, k, v = (
        np_linear(z, layer) for z, layer in ((x, attn.to_q), (kv, attn.to_k), (kv, attn.to_v))
    )
    split = lambda z: z.reshape(z.shape[0], heads, -1).transpose(1, 0, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]), axis=-1)
    out = (w @ v).transpose(1, 0, 2).reshape(x.shape[0], -1)
    return np_linear(out, attn.to_out)


def channels_last(x: np.ndarray) -> jax.Array:
    """A channels-first numpy image as the channels-last array the UNet's blocks take."""
    return jnp.asarray(np.moveaxis(x, 0, -1))


def channels_first(x: jax.Array) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, 0)


def test_res_block_matches_numpy(getkey):
    block = perturb(_ResBlock(32, 64, 24, 0.3, key=getkey()))
    x = np.random.default_rng(0).standard_normal((32, 4, 4)).astype(np.float32)
    cond = np.random.default_rng(1).standard_normal(24).astype(np.float32)
    got = channels_first(block(channels_last(x), jnp.asarray(cond), key=None, inference=True))
    h = np_conv(np_silu(np_group_norm(x, block.in_norm, 1e-5)), block.in_conv)
    scale, shift = np.split(np_linear(np_silu(cond), block.film), 2)
    h = np_group_norm(h, block.out_norm, 1e-5) * (1 + scale[:, None, None]) + shift[:, None, None]
    want = np_conv(x, block.skip) + np_conv(np_silu(h), block.out_conv)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_self_attention_matches_guided_diffusion_layout(getkey):
    """Heads split before q/k/v, as guided diffusion's legacy attention (channels-first there)."""
    heads, ch = 2, 64
    block = perturb(_SelfAttention(ch, heads, key=getkey()))
    x = np.random.default_rng(0).standard_normal((ch, 4, 4)).astype(np.float32)
    got = channels_first(block(channels_last(x)))
    h = np_group_norm(x, block.norm, 1e-5).reshape(ch, -1)
    qkv = np.asarray(block.qkv.weight) @ h + np.asarray(block.qkv.bias)[:, None]
    qkv = qkv.reshape(heads, 3 * ch // heads, -1)
    q, k, v = np.split(qkv, 3, axis=1)
    w = softmax(np.einsum("hct,hcs->hts", q, k) / math.sqrt(ch // heads), axis=-1)
    a = np.einsum("hts,hcs->hct", w, v).reshape(ch, -1)
    out = np.asarray(block.proj.weight) @ a + np.asarray(block.proj.bias)[:, None]
    np.testing.assert_allclose(np.asarray(got), x + out.reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_cross_attention_matches_numpy(getkey):
    attn = _MultiHeadAttention(64, 16, 4, key=getkey())
    x = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    kv = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    got = attn(jnp.asarray(x), jnp.asarray(kv))
    np.testing.assert_allclose(np.asarray(got), np_mha(x, kv, attn, 4), rtol=1e-4, atol=1e-4)


def test_spatial_transformer_matches_numpy(getkey):
    ch, heads = 64, 2
    block = perturb(_SpatialTransformer(ch, 16, heads, key=getkey()))
    x = np.random.default_rng(0).standard_normal((ch, 4, 4)).astype(np.float32)
    ctx = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    got = channels_first(block(channels_last(x), jnp.asarray(ctx)))
    h = np_linear(np_group_norm(x, block.norm, 1e-6).reshape(ch, -1).T, block.proj_in)
    z = np_layer_norm(h, block.norm1)
    h = h + np_mha(z, z, block.self_attn, heads)
    h = h + np_mha(np_layer_norm(h, block.norm2), ctx, block.cross_attn, heads)
    value, gate = np.split(np_linear(np_layer_norm(h, block.norm3), block.ff_in), 2, axis=-1)
    gelu = 0.5 * gate * (1 + erf(gate / math.sqrt(2)))
    h = h + np_linear(value * gelu, block.ff_out)
    want = x + np_linear(h, block.proj_out).T.reshape(x.shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the network


def test_is_a_denoiser():
    assert issubclass(UNet, AbstractDenoiser)


@pytest.mark.parametrize("conditioning", ["film", "lag"])
def test_conditioning_reaches_every_block(conditioning, getkey):
    model = eqx.filter_eval_shape(
        lambda key: UNet(**TINY, conditioning=conditioning, image_size=SIZE, key=key),
        getkey(),
    )
    # tiny UNet: 2 down + 2 middle + 4 up residual blocks; attention at 4x4 (1 down, 2 up) + middle
    assert len(submodules(model, _ResBlock)) == 8
    attn = submodules(model, _SpatialTransformer if conditioning == "lag" else _SelfAttention)
    assert len(attn) == 4
    film_in = {b.film.in_features for b in submodules(model, _ResBlock)}
    assert film_in == {4 * 32 + (CTX if conditioning == "film" else 0)}


def test_zero_output_and_zero_gradient_at_init(pair, batch, getkey):
    conditioning, model, _ = pair
    x, t, target = batch
    ctx = context_for(conditioning, 3)
    out, loss, g_model, g_ctx = run(model, x, t, ctx, target, getkey(), False)
    assert out.shape == (BATCH, C_OUT, SIZE, SIZE)
    assert out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    # only the output convolution gets a gradient; nothing reaches the context
    assert np.all(np.asarray(g_ctx) == 0.0)
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(g_model, eqx.is_inexact_array))
    nonzero = {jax.tree_util.keystr(path) for path, g in leaves if np.any(np.asarray(g))}
    assert nonzero == {".out_conv.weight", ".out_conv.bias"}
    np.testing.assert_allclose(float(loss), float(jnp.mean(target**2)), rtol=1e-6)


def test_context_reaches_the_output_after_perturbation(pair, batch, getkey):
    conditioning, _, model = pair
    x, t, target = batch
    ctx = context_for(conditioning, 3)
    out, _, _, g_ctx = run(model, x, t, ctx, target, getkey(), False)
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.abs(np.asarray(out)).mean() > 1e-3
    assert g_ctx.shape == ctx.shape
    # every example's context vector, and in LAG mode every one of its tokens, moves the loss
    per_item = np.abs(np.asarray(g_ctx)).sum(-1)
    assert np.all(per_item > 1e-7)


def cut_context(model: UNet) -> UNet:
    """The model with every weight that reads the context set to zero."""
    if model.conditioning == "lag":
        return eqx.tree_at(
            lambda m: [
                w
                for blk in submodules(m, _SpatialTransformer)
                for w in (blk.cross_attn.to_k.weight, blk.cross_attn.to_v.weight)
            ],
            model,
            replace_fn=jnp.zeros_like,
        )
    time_dim = 4 * model.model_channels
    return eqx.tree_at(
        lambda m: [b.film.weight for b in submodules(m, _ResBlock)],
        model,
        replace_fn=lambda w: w.at[:, time_dim:].set(0.0),
    )


def test_context_changes_output_unless_its_weights_are_zero(pair, batch, getkey):
    conditioning, _, model = pair
    x, t, target = batch
    c1, c2 = context_for(conditioning, 7), context_for(conditioning, 8)
    key = getkey()
    y1, y2 = (np.asarray(run(model, x, t, c, target, key, False)[0]) for c in (c1, c2))
    assert np.abs(y1 - y2).max() > 1e-4
    cut = cut_context(model)
    z1, z2 = (run(cut, x, t, c, target, key, False) for c in (c1, c2))
    np.testing.assert_array_equal(np.asarray(z1[0]), np.asarray(z2[0]))
    assert np.all(np.asarray(z1[3]) == 0.0)
    assert np.abs(np.asarray(z1[0]) - y1).max() > 1e-4


def test_lag_is_invariant_to_the_order_of_context_tokens(batch):
    model = perturb(tiny("lag"))
    x, t, target = batch
    ctx = context_for("lag", 3)
    perm = jnp.array([3, 0, 4, 1, 2])
    y = run(model, x, t, ctx, target, jax.random.key(9), False)[0]
    y_perm = run(model, x, t, ctx[:, perm], target, jax.random.key(9), False)[0]
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_perm), rtol=1e-5, atol=1e-5)


def test_dropout_key_matters_only_in_training(batch):
    """The same residual blocks (and dropout) serve both conditioning modes; FiLM shown here."""
    model = perturb(tiny("film"))
    x, t, target = batch
    ctx = context_for("film", 3)

    def train(seed):
        return np.asarray(run(model, x, t, ctx, target, jax.random.key(seed), False)[0])

    def infer(seed):
        return np.asarray(forward(model, x, t, ctx, jax.random.key(seed), True))

    a, a_again, b = train(5), train(5), train(6)
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(a - b).max() > 1e-4
    c, d = infer(5), infer(6)
    np.testing.assert_array_equal(c, d)
    assert np.abs(a - c).max() > 1e-4


def test_odd_image_size_is_padded_and_cropped(batch, getkey):
    """A 7x7 UNet equals the 8x8 one (same weights) on the zero-padded image, cropped."""
    x, t, _ = batch
    m7, m8 = perturb(tiny("film", image_size=7)), perturb(tiny("film"))
    ctx = context_for("film", 3)
    x7 = x[:, :, :7, :7]
    key = getkey()
    got = forward(m7, x7, t, ctx, None, True)  # no key needed in inference
    assert got.shape == (BATCH, C_OUT, 7, 7)
    want = forward(m8, jnp.pad(x7, ((0, 0), (0, 0), (0, 1), (0, 1))), t, ctx, key, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[..., :7, :7], rtol=1e-5, atol=1e-5)


def cifar_batch() -> jax.Array:
    """Two real CIFAR-100 images, averaged down to 8x8, in [-1, 1]."""
    data = np.load(shared_path("data", "cifar100", "cifar100_subset.npz"))
    images = data["images"][[0, 1000]].astype(np.float32) / 127.5 - 1.0  # two classes
    images = images.reshape(2, SIZE, 4, SIZE, 4, 3).mean(axis=(2, 4))
    return jnp.asarray(images.transpose(0, 3, 1, 2))


def test_overfits_two_real_images(getkey):
    """Epsilon-prediction on two fixed noisy CIFAR images: Adam drives the loss far down."""
    x0 = cifar_batch()
    model = tiny("film")
    ctx = context_for("film", 3)
    eps = jax.random.normal(getkey(), x0.shape)
    t = jnp.array([50.0, 400.0])
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = jnp.asarray(np.cumprod(1 - betas)[[50, 400]], jnp.float32)[:, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps
    optim = optax.adam(3e-3)
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def update(model, grads, state):
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts and floats
            updates, state = optim.update(grads, state)
        return eqx.apply_updates(model, updates), state

    losses = []
    for _ in range(60):
        _, loss, grads, _ = run(model, x_t, t, ctx, eps, getkey(), False)
        model, state = update(model, grads, state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(float(jnp.mean(eps**2)), rel=1e-6)
    assert max(losses[-5:]) < 0.2 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# the paper's configuration


def reference_count(conditioning: str) -> int:
    """Parameters of the reference UNet, summed layer by layer from its definition."""
    mc, mult, nres, temb, ctx, heads_ds = 64, (1, 2, 3, 4), 2, 256, 256, (2, 4)
    lag = conditioning == "lag"

    def res(a, b):
        film_in = temb + (0 if lag else ctx)
        n = 2 * a + (9 * a * b + b) + (film_in * 2 * b + 2 * b) + 2 * b + (9 * b * b + b)
        return n + (a * b + b if a != b else 0)

    def attn(c):
        if not lag:  # norm, qkv 1x1 conv, proj_out 1x1 conv
            return 2 * c + (3 * c * c + 3 * c) + (c * c + c)
        n = 2 * c + (c * c + c)  # norm, proj_in
        n += 3 * c * c + (c * c + c)  # self-attention: q, k, v without bias, out
        n += c * c + 2 * ctx * c + (c * c + c)  # cross-attention
        n += (c * 8 * c + 8 * c) + (4 * c * c + c)  # GEGLU feed-forward
        return n + 3 * 2 * c + (c * c + c)  # three LayerNorms, proj_out

    n = (mc * temb + temb) + (temb * temb + temb) + (3 * mc * 9 + mc)
    chans, ch, ds = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(nres):
            n += res(ch, m * mc) + (attn(m * mc) if ds in heads_ds else 0)
            ch = m * mc
            chans.append(ch)
        if level != len(mult) - 1:
            n += 9 * ch * ch + ch
            chans.append(ch)
            ds *= 2
    n += res(ch, ch) + attn(ch) + res(ch, ch)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nres + 1):
            n += res(ch + chans.pop(), m * mc) + (attn(m * mc) if ds in heads_ds else 0)
            ch = m * mc
            if level and i == nres:
                n += 9 * ch * ch + ch
                ds //= 2
    return n + 2 * ch + (ch * 6 * 9 + 6)


@pytest.mark.parametrize("conditioning", ["film", "lag"])
def test_paper_configuration_parameter_count(conditioning, getkey):
    model = eqx.filter_eval_shape(
        lambda key: UNet(**PAPER, conditioning=conditioning, key=key), getkey()
    )
    assert reference_count("film") == REFERENCE_UNET_PARAMS
    assert n_params(model) == reference_count(conditioning)
    if conditioning == "film":
        assert n_params(model) == REFERENCE_UNET_PARAMS


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"conditioning": "cross"}, "conditioning"),
        ({"model_channels": 48}, "multiples of 32"),
        ({"attention_resolutions": (5,)}, "attention_resolutions"),
        ({"num_heads": 3}, "num_heads=3"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"num_res_blocks": 0}, "num_res_blocks=0"),
        ({"channel_mult": ()}, "channel_mult"),
    ],
)
def test_bad_configuration_is_one_readable_error(change, match, getkey):
    kwargs = {**TINY, "conditioning": "film", "image_size": SIZE, **change}
    # beartype (the test-time type checker) rejects a value outside the Literal first
    with pytest.raises((ValueError, TypeCheckError), match=match):
        UNet(**kwargs, key=getkey())


def test_bad_call_is_one_readable_error(pair, batch):
    conditioning, model, _ = pair
    x, t, _ = batch
    ctx = context_for(conditioning, 3)[0]
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        model(jnp.zeros((C_IN, 16, 16)), t[0], ctx, inference=True)
    wrong = jnp.zeros((N_TOKENS, CTX)) if conditioning == "film" else jnp.zeros((CTX,))
    with pytest.raises(ValueError, match=f"conditioning='{conditioning}'"):
        model(x[0], t[0], wrong, inference=True)
    with pytest.raises(ValueError, match="context_dim=16"):
        model(x[0], t[0], ctx[..., :-1], inference=True)
    with pytest.raises(ValueError, match="pass `key=`"):
        model(x[0], t[0], ctx)


def test_modulation_matches_numpy_from_the_film_weights(pair, batch):
    conditioning, _, model = pair
    _, t, _ = batch
    context = context_for(conditioning, 3)[0]
    got = {k: float(v) for k, v in eqx.filter_jit(model.modulation)(t[0], context).items()}
    half = model.model_channels // 2
    args = float(t[0]) * np.exp(-np.log(10000.0) * np.arange(half) / half)
    emb = np.concatenate([np.cos(args), np.sin(args)])
    cond = np_linear(np_silu(np_linear(emb, model.time_in)), model.time_out)
    if conditioning == "film":
        cond = np.concatenate([cond, np.asarray(context)])
    stages = [b for b in model.down if hasattr(b, "res")]
    blocks = {f"down{i}": s.res for i, s in enumerate(stages)}
    blocks.update({"mid1": model.mid_res1, "mid2": model.mid_res2})
    blocks.update({f"up{i}": s.res for i, s in enumerate(model.up)})
    assert len(blocks) == len(submodules(model, _ResBlock))
    expected = {}
    for name, block in blocks.items():
        scale, shift = np.split(np_linear(np_silu(cond), block.film), 2)
        expected[f"{name}/scale"] = np.sqrt(np.mean(scale**2))
        expected[f"{name}/shift"] = np.sqrt(np.mean(shift**2))
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert value > 1e-3
        assert got[name] == pytest.approx(value, rel=1e-4), name
