"""The optimiser, the EMA, the norms and the guard of the training step."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fsdm_eqx.config import OptimConfig
from fsdm_eqx.instrument import context_statistics, subtree_norms
from fsdm_eqx.train import learning_rate_schedule, make_train_step
from fsdm_eqx.train.step import grad_param_ratios
from tests.train_fixtures import (
    fresh_state,
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
    state = fresh_state(config, total_steps)
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


def _spec_context_statistics(c: np.ndarray) -> dict[str, float]:
    """The W&B metrics spec's definitions, in numpy float64: the L2 norm of the whole context
    array, mean |c|, max |c| and std of its entries."""
    c = np.asarray(c, np.float64).ravel()
    return {
        "debug/context_norm": float(np.sqrt(np.sum(c**2))),
        "debug/context_mean": float(np.mean(np.abs(c))),
        "debug/context_max": float(np.max(np.abs(c))),
        "debug/context_std": float(np.std(c)),
    }


def test_context_statistics_are_the_spec_definitions() -> None:
    # A shifted context: the signed mean and the mean of |c| differ.
    c = (np.random.default_rng(0).normal(size=(4, 6, 5)) - 0.3).astype(np.float32)
    stats = {k: float(v) for k, v in context_statistics(jnp.asarray(c)).items()}
    for name, value in _spec_context_statistics(c).items():
        assert stats[name] == pytest.approx(value, rel=1e-5), name
    assert stats["debug/context_vector_norm"] == pytest.approx(
        np.linalg.norm(c.astype(np.float64), axis=-1).mean(), rel=1e-5
    )
    assert stats["debug/context_signed_mean"] == pytest.approx(c.mean(), abs=1e-6)


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
        "debug/context_vector_norm", "debug/context_signed_mean",
        "debug/context_grad_norm", "Optim/lr", "Optim/update_global_norm", "Optim/ema_decay",
        "Optim/grad_global_norm", "Optim/param_global_norm",
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
    initial = fresh_state(config, 10)
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
    state = fresh_state(config, 10)
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


def test_step_logs_the_spec_metrics_of_its_batch() -> None:
    """The context statistics and the global norms of a step, against numpy computations of
    the spec's formulas on the batch's contexts, gradient and parameters."""
    config = OptimConfig(lr=1e-2)
    initial, _, history = run(config, steps=1)
    metrics = history[0]
    batch = jnp.asarray(tiny_batches(1)[0])
    contexts = np.asarray(jax.vmap(lambda x: tiny_context(initial.model, x))(batch))
    assert contexts.shape == (8, 1, 3)
    for name, value in _spec_context_statistics(contexts).items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name
    assert metrics["debug/context_max"] / metrics["debug/context_mean"] < 5

    _, step_key = jax.random.split(initial.key)
    keys = jax.random.split(step_key, batch.shape[0])
    params, static = eqx.partition(initial.model, eqx.is_inexact_array)

    def mean_loss(params):
        model = eqx.combine(params, static)
        return jnp.mean(jax.vmap(lambda x, k: tiny_loss(model, x, k)[0])(batch, keys))

    grads = jax.grad(mean_loss)(params)

    def l2(tree) -> float:
        leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
        return float(np.sqrt(sum(np.sum(x**2) for x in leaves)))

    assert metrics["Optim/param_global_norm"] == pytest.approx(l2(params), rel=1e-5)
    assert metrics["Optim/grad_global_norm"] == pytest.approx(l2(grads), rel=1e-4)
    assert metrics["Optim/grad_global_norm"] > 0
    assert "debug/grad_norm_dit" not in metrics  # the tiny model's denoiser is no DiT


def test_loss_reporting_a_context_must_take_the_offset() -> None:
    """A loss outside the `LossFn` protocol gets one error that names the missing keyword."""

    def no_offset(model, x_set, key):
        return tiny_loss(model, x_set, key)

    with pytest.raises(TypeError, match="takes no `context_offset` keyword") as info:
        run(OptimConfig(), steps=1, loss_fn=no_offset)
    assert "unexpected keyword argument 'context_offset'" in str(info.value.__cause__)


def _poisoned(model, x_set, key, *, context_offset=None):
    """`tiny_loss`, NaN on a set holding a value above 100 (a batch made non-finite on purpose)."""
    loss, aux = tiny_loss(model, x_set, key, context_offset=context_offset)
    return jnp.where(jnp.any(x_set > 100.0), jnp.nan, loss), aux


def _optax_counts(opt_state) -> set[int]:
    """Every update count optax keeps in ``opt_state`` (they count the applied updates)."""
    return {int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")}


def test_logged_lr_is_the_one_optax_applies_after_a_skipped_step() -> None:
    config = OptimConfig(lr=1e-2, warmup_steps=4, skip_nonfinite=True)
    schedule = learning_rate_schedule(config, total_steps=10)
    state = fresh_state(config, 10)
    step = make_train_step(_poisoned, config, total_steps=10)
    batches = [jnp.asarray(b) for b in tiny_batches(4)]
    batches[1] = batches[1].at[0, 0, 0].set(1e3)
    logged, applied, skipped = [], [], []
    for batch in batches:
        (count,) = _optax_counts(state.opt_state)
        applied.append(float(schedule(count)))
        state, metrics = step(state, batch)
        logged.append(float(metrics["Optim/lr"]))
        skipped.append(float(metrics["debug/nonfinite"]))
    assert skipped == [0.0, 1.0, 0.0, 0.0]
    assert _optax_counts(state.opt_state) == {3}
    # The third step applies the schedule's second value, not its third.
    assert logged == pytest.approx(applied) and logged[2] == pytest.approx(0.25e-2)


def test_update_norm_of_a_skipped_step_is_zero() -> None:
    config = OptimConfig(lr=1e-2, skip_nonfinite=True)
    state = fresh_state(config, 10)
    step = make_train_step(_poisoned, config, total_steps=10)
    batch = jnp.asarray(tiny_batches(1)[0])
    _, metrics = step(state, batch.at[0, 0, 0].set(1e3))
    assert float(metrics["debug/nonfinite"]) == 1.0
    assert float(metrics["Optim/update_global_norm"]) == 0.0
    assert float(metrics["debug/update_norm"]) == 0.0


def test_first_update_after_a_skip_moves_by_the_logged_lr() -> None:
    """Adam's first update is about lr per coordinate: the parameters show the lr applied."""
    config = OptimConfig(lr=1e-3, lr_schedule="cosine", skip_nonfinite=True)
    state = fresh_state(config, 2)
    step = make_train_step(_poisoned, config, total_steps=2)
    batch = jnp.asarray(tiny_batches(1)[0])
    state, _ = step(state, batch.at[0, 0, 0].set(1e3))
    before = np.asarray(state.model.denoiser.weight)
    state, metrics = step(state, batch)
    moved = np.abs(np.asarray(state.model.denoiser.weight) - before)
    assert float(metrics["Optim/lr"]) == pytest.approx(1e-3)
    assert np.median(moved) == pytest.approx(float(metrics["Optim/lr"]), rel=0.05)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_first_step_learns_without_warmup(schedule: str) -> None:
    config = OptimConfig(lr=1e-3, lr_schedule=schedule)
    assert float(learning_rate_schedule(config, total_steps=100)(0)) == pytest.approx(1e-3)
    initial, state, history = run(config, steps=1)
    assert history[0]["Optim/lr"] == pytest.approx(1e-3)
    moved = np.abs(np.asarray(state.model.denoiser.weight - initial.model.denoiser.weight))
    assert np.median(moved) == pytest.approx(1e-3, rel=0.05)


def test_step_decay_follows_its_formula() -> None:
    config = OptimConfig(
        lr=2.0, warmup_steps=10, lr_schedule="step", lr_decay_every=20, lr_decay_factor=0.5
    )
    lr = learning_rate_schedule(config, total_steps=1000)
    for count in (0, 5, 10, 29, 30, 49, 50, 95):
        expected = 2.0 * count / 10 if count < 10 else 2.0 * 0.5 ** ((count - 10) // 20)
        assert float(lr(count)) == pytest.approx(expected, rel=1e-6), count


def _loss_read_from_batch(model, x_set, key, *, context_offset=None):
    """A loss whose value is the set's first entry: the test dictates the loss of every step."""
    del key
    context = tiny_context(model, x_set)
    if context_offset is not None:
        context = context + context_offset
    loss = x_set[0, 0] + 0.0 * (jnp.sum(model.denoiser.weight) + jnp.sum(context))
    return loss, {"mse": loss, "context": context}


def _reference_plateau_lrs(losses, lr, factor, window, patience, rtol=1e-4):
    """The learning rate of each update under reduce-on-plateau, written out from its rule: the
    loss is averaged over windows of ``window`` steps; a window whose mean is not below
    (1 - rtol) times the best mean so far counts towards ``patience``, and reaching it
    multiplies the rate by ``factor`` from that step on."""
    best, bad, scale, rates = np.inf, 0, 1.0, []
    for start in range(0, len(losses), window):
        chunk = losses[start : start + window]
        mean = float(np.mean(chunk))
        if mean < (1 - rtol) * best:
            best, bad = mean, 0
        else:
            bad += 1
        reduce_now = bad >= patience
        if reduce_now:
            bad = 0
        rates += [lr * scale] * (len(chunk) - 1)
        scale *= factor if reduce_now else 1.0
        rates.append(lr * scale)
    return rates


def test_plateau_reduces_the_lr_when_the_training_loss_stalls() -> None:
    # Falling for three windows, then flat: two reductions after each `patience` flat windows.
    losses = [4.0, 4.0, 3.0, 3.0, 2.0, 2.0] + [2.0] * 8
    config = OptimConfig(
        lr=1e-2, lr_schedule="plateau", lr_decay_factor=0.5, plateau_window=2, plateau_patience=2
    )
    batches = [np.full((1, 5, 4), value, np.float32) for value in losses]
    state = fresh_state(config, total_steps=len(losses))
    step = make_train_step(_loss_read_from_batch, config, total_steps=len(losses))
    logged = []
    for batch in batches:
        state, metrics = step(state, jnp.asarray(batch))
        logged.append(float(metrics["Optim/lr"]))
    expected = _reference_plateau_lrs(losses, 1e-2, 0.5, window=2, patience=2)
    np.testing.assert_allclose(logged, expected, rtol=1e-6)
    assert min(expected) == pytest.approx(1e-2 / 4)  # the test reaches two reductions
