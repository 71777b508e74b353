"""FSDM: leave-one-out contexts, the per-set loss, compiling once, overfitting, sampling.

All tests share the `smoke` preset (32x32 images, sets of 6) and a few jitted functions built once
per module, since compilation dominates on a CPU.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fsdm_eqx import diffusion
from fsdm_eqx.config import DiffusionConfig, model_preset
from fsdm_eqx.nn import FSDM, count_parameters, leave_one_out_indices
from tests.conftest import shared_path
from tests.helpers import SMALL_UNET_ENCODER, perturb_zeros

CONFIG = model_preset("smoke")
NS, SHAPE = CONFIG.ns, (CONFIG.channels, CONFIG.image_size, CONFIG.image_size)
DIFFUSION = DiffusionConfig(num_steps=100, sampling_steps=4, sampler="ddim")
OVERFIT_STEPS, OVERFIT_FACTOR = 100, 2.0


@pytest.fixture(scope="module")
def model():
    return FSDM(CONFIG, key=jax.random.key(0))


@pytest.fixture(scope="module")
def schedule():
    return diffusion.make_schedule(DIFFUSION.schedule, DIFFUSION.num_steps)


OPTIMISER = optax.adam(3e-3)


@pytest.fixture(scope="module")
def train_step(model, schedule):
    """A jitted Adam step on the per-set loss (the training step vmaps the same loss over sets),
    with a list that grows each time it is traced. Returns the metrics at the given parameters."""
    traces = []
    static = eqx.partition(model, eqx.is_inexact_array)[1]

    @eqx.filter_jit
    def step(params, opt_state, x_set, key):
        traces.append(1)

        def objective(p):
            out = eqx.combine(p, static).loss(
                x_set, key=key, diffusion_config=DIFFUSION, schedule=schedule
            )
            return out["loss"], out

        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, opt_state = OPTIMISER.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    return step, traces


def _init_state(model):
    params = eqx.filter(model, eqx.is_inexact_array)
    return params, OPTIMISER.init(params)


def _random_set(seed, shape=(NS, *SHAPE)):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_leave_one_out_indices():
    idx = leave_one_out_indices(4)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


LOO_CONFIGS = {
    "vit-film-variational": {},
    "svit-lag-deterministic": dict(
        encoder="svit", pooling="mean_patch", conditioning="lag", variational=False
    ),
    "vit-lag-agg": dict(pooling="agg", conditioning="lag", variational=False),
    "vit-lag-none-variational": dict(pooling="none", conditioning="lag"),
    "unet-film-variational": SMALL_UNET_ENCODER,
}


@pytest.mark.parametrize("kind", list(LOO_CONFIGS))
def test_leave_one_out_gradient_and_permutation_invariance(kind, model, getkey):
    config = dataclasses.replace(CONFIG, **LOO_CONFIGS[kind])
    if kind != "vit-film-variational":
        # the UNet encoder's output map starts at zero: perturb it so that the images reach c
        model = perturb_zeros(FSDM(config, key=getkey()))
    x_set = _random_set(2)
    perm = jnp.array([2, 0, 5, 3, 1, 4])
    cotangent_key = getkey()

    @eqx.filter_jit
    def run(model, x_set, x_perm, key):
        def train_c(x):
            return model.leave_one_out_context(x, key=key).c

        def eval_c(x):
            return model.leave_one_out_context(x, inference=True).c

        grads = []
        # training mode (dropout keys, sampled posterior) when variational, else inference mode
        for fn in (train_c,) if model.posterior is not None else (eval_c,):
            # VJPs with random cotangents on one context at a time: row i of the result is
            # d(w_i . c_i)/d x_set, for random w_i
            c, vjp = jax.vjp(fn, x_set)
            mask = jnp.eye(NS).reshape(NS, NS, *([1] * (c.ndim - 1)))
            cotangents = jax.random.normal(cotangent_key, (NS, *c.shape)) * mask
            grads.append(jax.vmap(lambda ct, vjp=vjp: vjp(ct)[0])(cotangents))
        return grads, eval_c(x_set), eval_c(x_perm), model.encoder(x_set[1:])

    grads, c, c_perm, direct = run(model, x_set, x_set[perm], getkey())
    p = 16  # 4 x 4 patch positions
    tokens = {"mean_patch": p, "agg": 1 + p, "none": 1 + (NS - 1) * p}.get(config.pooling)
    c_shape = (NS, CONFIG.hdim) if tokens is None else (NS, tokens, CONFIG.hdim)
    assert c.shape == c_shape and c.dtype == jnp.float32
    for grad in grads:
        grad = np.asarray(grad)
        for i in range(NS):
            assert np.all(grad[i, i] == 0.0), f"c_{i} depends on x_{i}"
            for j in range(NS):
                if j != i:
                    assert np.abs(grad[i, j]).max() > 0.0, f"c_{i} ignores x_{j}"
    # contexts follow their image under a permutation of the set (for the order-invariant ViT
    # and UNet encoder; the sViT stacks the other images in order, and `none` keeps their tokens
    # in order, so their contexts change)
    follows = np.allclose(np.asarray(c_perm), np.asarray(c)[np.asarray(perm)], atol=1e-5)
    assert follows == (config.encoder != "svit" and config.pooling != "none")
    # c_0 is the encoding of the other images (posterior mean when variational)
    if model.posterior is not None:
        posterior = model.posterior if direct.ndim == 1 else jax.vmap(model.posterior)
        direct = posterior(direct)[0]
    np.testing.assert_allclose(np.asarray(c[0]), np.asarray(direct), rtol=1e-5, atol=1e-5)


def test_loss_metrics_and_compiles_once(model, train_step, getkey):
    step, traces = train_step
    params, opt_state = _init_state(model)
    outs = []
    for i in range(3):  # new data, new keys, updated parameters
        params, opt_state, out = step(params, opt_state, _random_set(10 + i), getkey())
        outs.append(out)
    assert len(traces) == 1
    out = outs[0]
    for name in ("loss", "mse", "vb", "klc"):
        assert out[name].shape == () and bool(jnp.isfinite(out[name]))
    assert out["context"].shape == (NS, CONFIG.hdim)
    assert out["context_mu"].shape == out["context_logvar"].shape == (NS, CONFIG.hdim)
    assert float(out["klc"]) > 0.0
    # klc is the mean per-dimension KL to N(0, I) in bits, over every leave-one-out context
    mu, logvar = np.asarray(out["context_mu"], np.float64), np.asarray(out["context_logvar"])
    ref = np.mean(0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)) / np.log(2.0)
    np.testing.assert_allclose(float(out["klc"]), ref, rtol=1e-4)
    # ... and each of the NS contexts has its own KL: a KL of one context would differ
    per_context = np.mean(0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar), axis=1)
    assert np.ptp(per_context) > 1e-3 * np.mean(per_context)
    # the loss is the hybrid loss of every image plus the KL:
    # mean_i(mse_i + vlb_weight * T * vb_i + klc_i), linear in the per-image terms
    weight = DIFFUSION.vlb_weight * DIFFUSION.num_steps
    terms = {k: np.float64(out[k]) for k in ("mse", "vb", "klc")}
    expected = terms["mse"] + weight * terms["vb"] + terms["klc"]
    np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-5)
    assert not np.allclose(float(outs[0]["loss"]), float(outs[1]["loss"]))


def test_bad_inputs_give_clear_errors(model, schedule, getkey):
    with pytest.raises(ValueError, match="variance"):
        model.loss(
            _random_set(0),
            key=getkey(),
            diffusion_config=DiffusionConfig(variance="fixed_small", loss="mse"),
            schedule=schedule,
        )
    with pytest.raises(ValueError, match="channels first"):
        model.leave_one_out_context(jnp.zeros((NS, 32, 32, 3)), inference=True)
    with pytest.raises(ValueError, match=r"ModelConfig\.ns"):
        model.loss(
            _random_set(0, (NS - 1, *SHAPE)),
            key=getkey(),
            diffusion_config=DIFFUSION,
            schedule=schedule,
        )
    with pytest.raises(ValueError, match="at least 2"):
        model.leave_one_out_context(jnp.zeros((1, *SHAPE)), inference=True)


def _cifar_set():
    data = np.load(shared_path("data", "cifar100", "cifar100_subset.npz"))
    images = data["images"][data["fine_labels"] == 0][:NS]  # six apples
    return jnp.asarray(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


def test_overfits_real_images(model, train_step, getkey):
    step, traces = train_step
    x_set = _cifar_set()
    params, opt_state = _init_state(model)
    eval_keys = jax.random.split(getkey(), 16)

    def eval_loss(params):
        # the loss at `params` for fixed keys (the step's update is discarded)
        return np.mean([float(step(params, opt_state, x_set, k)[2]["loss"]) for k in eval_keys])

    before = eval_loss(params)
    for key in jax.random.split(getkey(), OVERFIT_STEPS):
        params, opt_state, _ = step(params, opt_state, x_set, key)
    after = eval_loss(params)
    print(f"overfit: loss {before:.4f} -> {after:.4f} in {OVERFIT_STEPS} steps")
    assert after < before / OVERFIT_FACTOR, (before, after)
    assert len(traces) == 1


def test_sample_shapes(model, getkey):
    support = _random_set(20, (3, *SHAPE))
    run = eqx.filter_jit(lambda m, s, k: m.sample(s, 2, key=k, diffusion_config=DIFFUSION))
    images = run(model, support, getkey())
    assert images.shape == (2, *SHAPE) and images.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(images)))
    assert float(jnp.max(jnp.abs(images))) <= 1.0 + 1e-5  # clip_denoised keeps x_0 in range


def test_samples_follow_the_support_set(model, getkey):
    model = perturb_zeros(model, seed=7)
    run = eqx.filter_jit(lambda m, s, k: m.sample(s, 2, key=k, diffusion_config=DIFFUSION))
    a, b = _random_set(21, (5, *SHAPE)), _random_set(22, (5, *SHAPE))
    key = getkey()
    from_a, from_b = np.asarray(run(model, a, key)), np.asarray(run(model, b, key))
    assert np.abs(from_a - from_b).max() > 1e-3
    proj = model.denoiser.context_proj
    blind = eqx.tree_at(lambda m: m.denoiser.context_proj.weight, model, proj.weight * 0)
    np.testing.assert_allclose(
        np.asarray(run(blind, a, key)), np.asarray(run(blind, b, key)), atol=1e-6
    )


def test_parameter_counts_per_subtree(model, getkey):
    counts = count_parameters(model)
    assert list(counts) == ["encoder", "posterior", "denoiser", "null_context"]
    assert counts["null_context"] == CONFIG.hdim
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert sum(counts.values()) == sum(leaf.size for leaf in leaves)
    h = CONFIG.hdim
    assert counts["posterior"] == (h * h + h) + (h * 2 * h + 2 * h)
    # the same counts from abstract shapes, without allocating
    assert counts == count_parameters(eqx.filter_eval_shape(FSDM, CONFIG, key=getkey()))


TIME_CONFIG = dataclasses.replace(CONFIG, encoder_time_token=True)


def test_timestep_token_context_follows_each_images_timestep(getkey):
    model = FSDM(TIME_CONFIG, key=getkey())
    x_set = _random_set(30)
    contexts = eqx.filter_jit(lambda m, x, t: m.leave_one_out_context(x, t, inference=True).c)
    t = jnp.array([10.0, 200.0, 300.0, 400.0, 500.0, 600.0])
    a = np.asarray(contexts(model, x_set, t))
    b = np.asarray(contexts(model, x_set, t.at[0].set(900.0)))
    assert not np.allclose(a[0], b[0])  # c_0 sees t_0
    np.testing.assert_array_equal(a[1:], b[1:])  # the others do not
    with pytest.raises(ValueError, match="timestep token"):
        model.leave_one_out_context(x_set, inference=True)


@pytest.mark.slow
def test_timestep_token_loss_and_sampling(schedule, getkey):
    model = FSDM(TIME_CONFIG, key=getkey())
    run = eqx.filter_jit(
        lambda m, x, k: m.loss(x, key=k, diffusion_config=DIFFUSION, schedule=schedule)
    )
    out = run(model, _random_set(31), getkey())
    assert bool(jnp.isfinite(out["loss"])) and out["context"].shape == (NS, CONFIG.hdim)
    for sampler in ("ddpm", "ddim", "ode"):
        config = dataclasses.replace(DIFFUSION, sampler=sampler)

        @eqx.filter_jit
        def sample(m, support, key, config=config):
            return m.sample(support, 2, key=key, diffusion_config=config)

        images = sample(model, _random_set(32, (2, *SHAPE)), getkey())
        assert images.shape == (2, *SHAPE) and bool(jnp.all(jnp.isfinite(images)))


TINY_DIT = dict(dit_size=None, dit_hidden=32, dit_depth=1, dit_heads=2, dit_patch_size=4)
NEW_PRESETS = (
    "vfsddpm_cifar100_vit_lag_agg_sigma",
    "vfsddpm_cifar100_vit_lag_none_sigma",
    "vfsddpm_cifar100_vitset_lag_none_sigma",
    "vfsddpm_cifar100_unet_film_mean_sigma",
    "vfsddpm_cifar100_unet_film_mean_vi",
)


def _tiny(name, **changes):
    """A preset's encoder, pooling, conditioning and context, with tiny networks on 16x16 sets
    of 4."""
    return dataclasses.replace(
        model_preset(name),
        **changes,
        hdim=32,
        encoder_depth=1,
        encoder_heads=2,
        encoder_head_dim=32,
        encoder_mlp_dim=64,
        encoder_patch_size=8,
        image_size=16,
        ns=4,
        unet_model_channels=32,
        unet_channel_mult=(1, 2),
        unet_num_res_blocks=1,
        unet_attention_resolutions=(8,),
        unet_num_heads=2,
    )


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_training_step_of_each_reference_run(name, schedule):
    """A gradient step of the preset's model gives a finite loss and finite gradients that
    reach the encoder (with a tiny DiT for the preset's UNet, which compiles faster)."""
    config = _tiny(name, denoiser="dit", **TINY_DIT)
    model = perturb_zeros(FSDM(config, key=jax.random.key(0)))
    x_set = _random_set(40, (config.ns, 3, 16, 16))

    @eqx.filter_jit
    def step(model, x_set, key):
        def objective(m):
            out = m.loss(x_set, key=key, diffusion_config=DIFFUSION, schedule=schedule)
            return out["loss"], out

        return eqx.filter_value_and_grad(objective, has_aux=True)(model)

    (loss, out), grads = step(model, x_set, jax.random.key(1))
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads.encoder)) > 0.0
    patches = 4  # 2 x 2 patch positions of 8 pixels
    tokens = {"agg": 2 + patches, "none": 2 + (config.ns - 1) * patches}  # class and time tokens
    if config.encoder == "svit":
        tokens["none"] = 2 + patches  # one grid: the set stacked on channels
    want = (config.ns, config.hdim)
    if config.pooling in tokens:
        want = (config.ns, tokens[config.pooling], config.hdim)
    assert out["context"].shape == want
    assert (float(out["klc"]) > 0.0) == config.variational


def test_none_contexts_grow_with_the_support_and_guidance_uses_one_null_token():
    """With `none` pooling the context has a token per patch of every support image, at any
    support size, and classifier-free guidance compares it with a single null token."""
    config = _tiny("vfsddpm_cifar100_vit_lag_none_sigma")
    model = perturb_zeros(FSDM(config, key=jax.random.key(0)))
    assert model.null_context is not None and model.null_context.shape == (1, config.hdim)
    diffusion_config = dataclasses.replace(DIFFUSION, sampling_steps=2, guidance_scale=2.0)
    sample = eqx.filter_jit(
        lambda m, s, k: m.sample(s, 1, key=k, diffusion_config=diffusion_config)
    )
    for m in (2, 5):
        support = _random_set(41, (m, 3, 16, 16))
        assert model.context(support, jnp.asarray(0.0), inference=True).c.shape == (
            2 + 4 * m,
            config.hdim,
        )
        images = sample(model, support, jax.random.key(2))
        assert images.shape == (1, 3, 16, 16) and bool(jnp.all(jnp.isfinite(images)))
