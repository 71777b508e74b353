"""Histograms per parameter path, and the gradient and update they are drawn from."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.config import OptimConfig
from fsdm_eqx.instrument.histograms import path_histograms
from fsdm_eqx.train import init_train_state, make_train_step, make_update_probe
from tests.train_fixtures import TinyModel, tiny_batches, tiny_loss


def test_each_leaf_under_its_path_with_caps():
    tree = {"enc": {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.arange(3)}, "dec": [jnp.ones(4)]}
    histograms = path_histograms(tree, "grads")
    assert set(histograms) == {"grads/enc/w", "grads/dec/0"}  # integer leaves left out
    np.testing.assert_array_equal(histograms["grads/enc/w"], np.arange(6.0))
    assert histograms["grads/dec/0"].dtype == np.float32
    many = {f"layer{i:02d}": jnp.full(3, float(i)) for i in range(10)}
    capped = path_histograms(many, "p", max_paths=4, max_values=2)
    assert sorted(capped) == ["p/layer00", "p/layer03", "p/layer06", "p/layer09"]
    assert all(v.size == 2 for v in capped.values())
    with pytest.raises(ValueError, match="keeps nothing"):
        path_histograms(tree, "g", max_paths=0)


def test_update_probe_gives_what_the_step_applies():
    config = OptimConfig(lr=1e-2, ema_start=0)
    state = init_train_state(
        TinyModel(jax.random.key(0)), config, key=jax.random.key(1), total_steps=10
    )
    batch = jnp.asarray(tiny_batches(1)[0])
    grads, updates = make_update_probe(tiny_loss, config)(state, batch)
    before = jax.tree_util.tree_map(np.asarray, eqx.filter(state.model, eqx.is_array))
    after, metrics = make_train_step(tiny_loss, config)(state, batch)
    moved = jax.tree_util.tree_map(
        lambda new, old: np.asarray(new) - old, eqx.filter(after.model, eqx.is_array), before
    )
    leaves = zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(moved), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-8)
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads)))
    assert norm == pytest.approx(float(metrics["debug/grad_norm"]), rel=1e-5)
