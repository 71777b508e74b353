"""The FSDM objective through the training step: norms per subtree, context statistics, the
gradient with respect to the contexts and the denoiser's modulation magnitudes.

Both tests share one run of three steps (module fixture), so the step compiles once.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx import DiffusionConfig
from fsdm_eqx.config import OptimConfig, model_preset
from fsdm_eqx.diffusion import make_schedule
from fsdm_eqx.nn import FSDM
from fsdm_eqx.nn.dit import ADALN_PARTS, DiT
from fsdm_eqx.train import fsdm_loss_fn, init_train_state, make_train_step

CONFIG = model_preset("smoke")
DIFFUSION = DiffusionConfig(num_steps=100, sampling_steps=10)


@pytest.fixture(scope="module")
def run():
    """Three steps of the smoke FSDM with a frozen posterior: the batch, the initial posterior,
    the state before the last step and after it, and the metrics of each step."""
    optim = OptimConfig(lr=1e-3, frozen=("posterior",))
    model = FSDM(CONFIG, key=jax.random.key(0))
    state = init_train_state(model, optim, key=jax.random.key(1), total_steps=10)
    step = make_train_step(fsdm_loss_fn(DIFFUSION), optim, total_steps=10)
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, size=(2, CONFIG.ns, 3, 32, 32)).astype(np.float32)
    posterior = np.asarray(jax.tree_util.tree_leaves(state.model.posterior)[0]).copy()
    history = []
    for _ in range(3):  # the step donates its input: keep a copy of the state before step 3
        before = jax.tree_util.tree_map(lambda x: x.copy() if eqx.is_array(x) else x, state)
        state, metrics = step(state, jnp.asarray(batch))
        history.append({k: float(v) for k, v in metrics.items()})
    return batch, posterior, before, state, history


def test_fsdm_trains_through_the_step(run) -> None:
    _, posterior_before, _, state, history = run
    values = history[-1]
    for name in ("loss", "mse", "vb", "klc", "debug/context_norm", "debug/context_std",
                 "debug/grad_norm_encoder", "debug/grad_norm_denoiser",
                 "debug/param_norm_encoder", "debug/param_norm_denoiser",
                 "debug/context_grad_norm", "debug/grad_param_ratio_encoder"):  # fmt: skip
        assert np.isfinite(values[name]), name
    assert "debug/grad_norm_posterior" not in values
    assert values["debug/nonfinite"] == 0.0
    np.testing.assert_array_equal(
        np.asarray(jax.tree_util.tree_leaves(state.model.posterior)[0]), posterior_before
    )
    # Modulation per DiT block: all zero at initialisation (adaLN-Zero); the values themselves
    # are checked against numpy in the DiT and UNet tests.
    _, depth, _ = CONFIG.dit_dims
    names = [f"debug/modulation/block{i}/{part}" for i in range(depth) for part in ADALN_PARTS]
    names += ["debug/modulation/final/shift", "debug/modulation/final/scale"]
    assert {k for k in history[0] if k.startswith("debug/modulation/")} == set(names)
    assert all(history[0][name] == 0.0 for name in names)
    assert all(np.isfinite(history[2][name]) for name in names)
    # At initialisation the output ignores the context, so no gradient reaches it.
    assert history[0]["debug/context_grad_norm"] == 0.0


@pytest.mark.slow
def test_fsdm_context_grad_norm_matches_jax_grad_over_a_context_offset(run) -> None:
    """Per set, d loss / d (its leave-one-out contexts), as jax.grad of the summed per-set
    losses with respect to an offset on the contexts gives it. (Two steps make the final adaLN
    move, so that the context matters.)"""
    batch, _, before, _, history = run
    schedule = make_schedule(DIFFUSION.schedule, DIFFUSION.num_steps)
    _, step_key = jax.random.split(before.key)
    keys = jax.random.split(step_key, batch.shape[0])

    @eqx.filter_jit
    def per_set_context_grads(model, batch, keys):
        def total(offsets):
            def one(x_set, key, offset):
                return _set_loss(model, x_set, key, offset, schedule)["loss"]

            return jnp.sum(jax.vmap(one)(batch, keys, offsets))

        return jax.grad(total)(jnp.zeros((batch.shape[0], CONFIG.ns, CONFIG.hdim)))

    grads = np.asarray(per_set_context_grads(before.model, jnp.asarray(batch), keys))
    expected = np.mean(np.linalg.norm(grads.reshape(grads.shape[0], -1), axis=1))
    assert expected > 0
    assert history[2]["debug/context_grad_norm"] == pytest.approx(expected, rel=1e-4)


def _set_loss(model, x_set, key, offset, schedule):
    """`FSDM.loss` of one set with the step's settings and a context offset."""
    return model.loss(
        x_set, key=key, diffusion_config=DIFFUSION, schedule=schedule, context_offset=offset
    )


def _l2(tree) -> float:
    """The L2 norm of a PyTree's floating-point arrays together, in numpy float64."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves)))


def test_fsdm_with_a_dit_logs_the_spec_names(run) -> None:
    """`debug/grad_norm_dit` and `debug/param_norm_dit` for the DiT denoiser, beside the
    generic `_denoiser` names."""
    _, _, before, _, history = run
    assert isinstance(before.model.denoiser, DiT)
    metrics = history[2]
    for kind in ("grad_norm", "param_norm"):
        assert metrics[f"debug/{kind}_dit"] == metrics[f"debug/{kind}_denoiser"]
    assert metrics["debug/param_norm_dit"] == pytest.approx(_l2(before.model.denoiser), rel=1e-5)


@pytest.mark.slow
def test_fsdm_spec_metrics_match_numpy(run) -> None:
    """The context statistics and the DiT's gradient norm of step 3, against numpy on the
    contexts and gradient of the same losses (the step's keys, a zero context offset)."""
    batch, _, before, _, history = run
    schedule = make_schedule(DIFFUSION.schedule, DIFFUSION.num_steps)
    _, step_key = jax.random.split(before.key)
    keys = jax.random.split(step_key, batch.shape[0])
    offsets = jnp.zeros((batch.shape[0], CONFIG.ns, CONFIG.hdim))

    @eqx.filter_jit
    def grads_and_contexts(model, batch, keys):
        def mean_loss(model):
            def one(x_set, key, offset):
                out = _set_loss(model, x_set, key, offset, schedule)
                return out["loss"], out["context"]

            losses, contexts = jax.vmap(one)(batch, keys, offsets)
            return jnp.mean(losses), contexts

        return eqx.filter_grad(mean_loss, has_aux=True)(model)

    grads, contexts = grads_and_contexts(before.model, jnp.asarray(batch), keys)
    metrics = history[2]
    assert metrics["debug/grad_norm_dit"] == pytest.approx(_l2(grads.denoiser), rel=1e-4)
    c = np.asarray(contexts, np.float64).ravel()
    assert metrics["debug/context_norm"] == pytest.approx(np.sqrt(np.sum(c**2)), rel=1e-5)
    assert metrics["debug/context_mean"] == pytest.approx(np.mean(np.abs(c)), rel=1e-5)
    assert metrics["debug/context_max"] == pytest.approx(np.max(np.abs(c)), rel=1e-5)
    assert metrics["debug/context_std"] == pytest.approx(np.std(c), rel=1e-4)
