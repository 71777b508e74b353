"""The optimiser, the EMA, the norms and the guard of the training step."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.config import OptimConfig
from fsdm_eqx.instrument import context_statistics, subtree_norms
from fsdm_eqx.train import init_train_state, learning_rate_schedule, make_train_step
from fsdm_eqx.train.step import grad_param_ratios
from tests.train_fixtures import (
    TinyModel,
    tiny_batches,
    tiny_context,
    tiny_loss,
    tiny_loss_given_context,
    tiny_noise,
)


@functools.cache
def cached_step(loss_fn, config: OptimConfig, total_steps: int):
    """One jitted step per setting, so that tests sharing a setting compile it once."""
    return make_train_step(loss_fn, config, total_steps=total_steps)


def run(config: OptimConfig, steps: int = 3, loss_fn=tiny_loss, total_steps: int = 100):
    state = init_train_state(
        TinyModel(jax.random.key(0)), config, key=jax.random.key(1), total_steps=total_steps
    )
    step = cached_step(loss_fn, config, total_steps)
    initial = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    history = []
    for batch in tiny_batches(steps):
        state, metrics = step(state, jnp.asarray(batch))
        history.append({k: float(v) for k, v in metrics.items()})
    return initial, state, history


def test_subtree_norms_match_numpy_on_a_known_tree() -> None:
    tree = {
        "a": {"w": jnp.array([3.0, 4.0]), "n": jnp.array([1, 2])},
        "b": [jnp.ones((2, 2)), jnp.array(-2.0)],
    }
    norms = subtree_norms(tree, "g")
    assert set(norms) == {"g", "g_a", "g_b"}
    assert float(norms["g_a"]) == pytest.approx(5.0)
    assert float(norms["g_b"]) == pytest.approx(np.sqrt(4 + 4))
    assert float(norms["g"]) == pytest.approx(np.sqrt(25 + 8))


def test_context_statistics_match_numpy() -> None:
    c = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    stats = context_statistics(jnp.asarray(c))
    assert float(stats["debug/context_norm"]) == pytest.approx(
        np.linalg.norm(c, axis=-1).mean(), rel=1e-5
    )
    assert float(stats["debug/context_mean"]) == pytest.approx(c.mean(), abs=1e-6)
    assert float(stats["debug/context_max"]) == pytest.approx(np.abs(c).max())
    assert float(stats["debug/context_std"]) == pytest.approx(c.std(), rel=1e-4)


def test_step_trains_and_reports_every_metric() -> None:
    config = OptimConfig(lr=1e-2)
    initial, state, history = run(config, steps=20)
    assert history[-1]["loss"] < history[0]["loss"]
    assert int(state.step) == 20
    expected = {
        "loss", "mse", "lr", "debug/update_norm", "debug/nonfinite",
        "debug/grad_norm", "debug/grad_norm_encoder", "debug/grad_norm_denoiser",
        "debug/param_norm", "debug/param_norm_encoder", "debug/param_norm_denoiser",
        "debug/context_norm", "debug/context_mean", "debug/context_max", "debug/context_std",
        "debug/context_grad_norm", "Optim/lr", "Optim/update_global_norm", "Optim/ema_decay",
        "debug/grad_param_ratio", "debug/grad_param_ratio_encoder",
        "debug/grad_param_ratio_denoiser",
    }  # fmt: skip
    assert expected <= set(history[0])
    assert history[0]["lr"] == pytest.approx(1e-2)
    params = np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(eqx.filter(initial.model, eqx.is_array))]
    )
    assert history[0]["debug/param_norm"] == pytest.approx(np.linalg.norm(params), rel=1e-5)


def test_frozen_subtree_does_not_move_and_has_no_optimiser_state() -> None:
    config = OptimConfig(lr=1e-2, frozen=("encoder",))
    initial, state, history = run(config)
    assert eqx.tree_equal(initial.model.encoder, state.model.encoder)
    assert not eqx.tree_equal(initial.model.denoiser, state.model.denoiser)
    assert "debug/grad_norm_encoder" not in history[0]
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
    assert {x.shape for x in moments} == {(4, 7), (4,)}


def test_lr_multiplier_scales_the_first_adam_step() -> None:
    """Adam's first update is about lr per coordinate, so the factor shows directly."""
    config = OptimConfig(lr=1e-3, lr_multipliers=(("encoder", 3.0),))
    initial, state, _ = run(config, steps=1)
    enc = np.abs(np.asarray(state.model.encoder.weight - initial.model.encoder.weight))
    den = np.abs(np.asarray(state.model.denoiser.weight - initial.model.denoiser.weight))
    assert np.median(enc) == pytest.approx(3e-3, rel=0.05)
    assert np.median(den) == pytest.approx(1e-3, rel=0.05)


def test_clipping_bounds_the_gradient_fed_to_adam() -> None:
    # With the gradient clipped far below Adam's eps, the first update shrinks from ~lr to ~0.
    _, _, free = run(OptimConfig(lr=1e-3, eps=1e-3), steps=1)
    _, _, history = run(OptimConfig(lr=1e-3, grad_clip=1e-12, eps=1e-3), steps=1)
    assert free[0]["debug/update_norm"] > 1e-3
    assert history[0]["debug/update_norm"] < 1e-6
    assert history[0]["debug/grad_norm"] > 1e-3


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_then_schedule(schedule: str) -> None:
    config = OptimConfig(lr=2.0, warmup_steps=10, lr_schedule=schedule)
    lr = learning_rate_schedule(config, total_steps=110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1.0)
    assert float(lr(10)) == pytest.approx(2.0)
    expected_60 = 2.0 if schedule == "constant" else 2.0 * 0.5 * (1 + np.cos(np.pi * 50 / 100))
    assert float(lr(60)) == pytest.approx(expected_60, rel=1e-5)


def test_ema_copies_then_averages() -> None:
    config = OptimConfig(lr=1e-2, ema_decay=0.9, ema_start=2, ema_every=1)
    initial = init_train_state(
        TinyModel(jax.random.key(0)), config, key=jax.random.key(1), total_steps=10
    )
    step = make_train_step(tiny_loss, config, total_steps=10)
    batches = tiny_batches(3)
    s1, _ = step(initial, jnp.asarray(batches[0]))
    assert eqx.tree_equal(s1.ema, s1.model)  # step 1 < ema_start: a copy
    w1 = np.asarray(s1.model.denoiser.weight)
    s2, _ = step(s1, jnp.asarray(batches[1]))
    w2 = np.asarray(s2.model.denoiser.weight)
    np.testing.assert_allclose(np.asarray(s2.ema.denoiser.weight), 0.9 * w1 + 0.1 * w2, rtol=1e-6)


def test_ema_every_k_steps() -> None:
    config = OptimConfig(lr=1e-2, ema_decay=0.5, ema_start=0, ema_every=2)
    initial, state, _ = run(config, steps=3)
    _, s2, _ = run(config, steps=2)
    # Updated at step 2 only (steps 1 and 3 are not multiples of 2): ema = 0.5 * w0 + 0.5 * w2.
    w0, w2 = np.asarray(initial.model.denoiser.weight), np.asarray(s2.model.denoiser.weight)
    np.testing.assert_allclose(
        np.asarray(state.ema.denoiser.weight), 0.5 * w0 + 0.5 * w2, rtol=1e-6
    )
    assert not np.allclose(np.asarray(state.model.denoiser.weight), w2)


def test_nonfinite_loss_skips_the_update() -> None:
    def poisoned(model, x_set, key, *, context_offset=None):
        loss, aux = tiny_loss(model, x_set, key, context_offset=context_offset)
        bad = jnp.any(x_set > 100.0)
        return jnp.where(bad, jnp.nan, loss), aux

    config = OptimConfig(lr=1e-2, skip_nonfinite=True)
    state = init_train_state(
        TinyModel(jax.random.key(0)), config, key=jax.random.key(1), total_steps=10
    )
    before = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    step = make_train_step(poisoned, config, total_steps=10)
    batch = jnp.asarray(tiny_batches(1)[0]).at[0, 0, 0].set(1e3)
    after, metrics = step(state, batch)
    assert float(metrics["debug/nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert eqx.tree_equal(after.model, before.model) and eqx.tree_equal(
        after.opt_state, before.opt_state
    )
    assert int(after.step) == 1


def test_bfloat16_compute_is_close_to_float32() -> None:
    _, _, f32 = run(OptimConfig(lr=1e-3), steps=1)
    _, _, bf16 = run(OptimConfig(lr=1e-3, precision="bfloat16"), steps=1)
    # bfloat16 keeps 8 bits of mantissa: the loss agrees to about 1% on this model.
    assert bf16[0]["loss"] == pytest.approx(f32[0]["loss"], rel=2e-2)
    assert bf16[0]["loss"] != f32[0]["loss"]


def test_unknown_subtree_names_are_one_clear_error() -> None:
    with pytest.raises(ValueError, match="does not have"):
        run(OptimConfig(frozen=("decoder",)), steps=1)


def test_grad_param_ratios_match_numpy_on_a_known_tree() -> None:
    grads = {"a": {"w": jnp.array([0.3, 0.4])}, "b": [jnp.ones((2, 2)), jnp.array(-2.0)]}
    params = {"a": {"w": jnp.array([6.0, 8.0])}, "b": [jnp.zeros((2, 2)), jnp.array(0.0)]}
    ratios = grad_param_ratios(grads, params)
    assert set(ratios) == {
        "debug/grad_param_ratio",
        "debug/grad_param_ratio_a",
        "debug/grad_param_ratio_b",
    }
    assert float(ratios["debug/grad_param_ratio_a"]) == pytest.approx(0.5 / 10.0)
    assert float(ratios["debug/grad_param_ratio_b"]) == 0.0  # zero parameters: reported as 0
    assert float(ratios["debug/grad_param_ratio"]) == pytest.approx(np.sqrt(0.25 + 8) / 10.0)


def test_optimiser_metrics_match_the_applied_update() -> None:
    config = OptimConfig(lr=1e-2, warmup_steps=4)
    _, state, history = run(config, steps=3)
    assert [h["Optim/lr"] for h in history] == pytest.approx([0.0, 0.25e-2, 0.5e-2])
    assert all(h["Optim/lr"] == h["lr"] for h in history)
    _, one, first = run(config, steps=2)
    delta = [
        np.asarray(b, np.float64) - np.asarray(a, np.float64)
        for a, b in zip(
            jax.tree_util.tree_leaves(eqx.filter(one.model, eqx.is_array)),
            jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_array)),
            strict=True,
        )
    ]
    # The third step's update is the difference of the parameters after steps 2 and 3.
    metrics = history[2]
    assert metrics["Optim/update_global_norm"] == pytest.approx(
        np.sqrt(sum(np.sum(d**2) for d in delta)), rel=1e-3
    )
    assert metrics["Optim/update_global_norm"] == metrics["debug/update_norm"]
    assert first[1] == history[1]
    for name in ("", "_encoder", "_denoiser"):
        assert metrics[f"debug/grad_param_ratio{name}"] == pytest.approx(
            metrics[f"debug/grad_norm{name}"] / metrics[f"debug/param_norm{name}"], rel=1e-6
        )


def test_ema_decay_metric_is_the_decay_applied_at_each_step() -> None:
    config = OptimConfig(lr=1e-2, ema_decay=0.9, ema_start=2, ema_every=2)
    _, _, history = run(config, steps=5)
    # step 1: a copy (decay 0); steps 2 and 4 average; steps 3 and 5 leave the EMA alone.
    assert [h["Optim/ema_decay"] for h in history] == pytest.approx([0.0, 0.9, 0.0, 0.9, 0.0])


def test_context_grad_norm_matches_a_closure_over_the_context() -> None:
    config = OptimConfig(lr=1e-2)
    initial, _, history = run(config, steps=1)
    batch = jnp.asarray(tiny_batches(1)[0])
    _, step_key = jax.random.split(initial.key)
    keys = jax.random.split(step_key, batch.shape[0])
    model = initial.model
    noises = jax.vmap(tiny_noise)(keys, batch)

    @jax.jit
    def norm_of_set(x_set, noise):
        context = tiny_context(model, x_set)
        grad = jax.grad(lambda c: tiny_loss_given_context(model, x_set, noise, c))(context)
        return jnp.linalg.norm(grad)

    expected = np.mean([float(norm_of_set(batch[b], noises[b])) for b in range(batch.shape[0])])
    assert expected > 0
    assert history[0]["debug/context_grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_loss_reporting_a_context_must_take_the_offset() -> None:
    def no_offset(model, x_set, key):
        return tiny_loss(model, x_set, key)

    with pytest.raises(TypeError, match="context_offset"):
        run(OptimConfig(), steps=1, loss_fn=no_offset)
