"""Run by the parallel tests in a fresh interpreter (device flags must precede JAX's import).

``sharded``: on 8 host-platform devices, train the tiny model a few steps with and without the
mesh and print the largest parameter difference. ``resume DIR``: on 8 devices, train half the
steps, checkpoint into DIR, restore into a fresh replicated state, finish, and compare with an
uninterrupted run. ``worker RANK PORT OUT``: one of two processes of a `jax.distributed` run;
writes its final parameters to OUT.
"""

import os
import sys

if sys.argv[1] in ("sharded", "resume"):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fsdm_eqx.config import OptimConfig
from fsdm_eqx.train import (
    make_mesh,
    make_train_step,
    replicate,
    restore_checkpoint,
    save_checkpoint,
    shard_batch,
)
from tests.train_fixtures import fresh_state, tiny_batches, tiny_loss

CONFIG = OptimConfig(lr=1e-2, ema_start=0, ema_every=1)
STEPS = 4


def placed_state(mesh):
    state = fresh_state(CONFIG, STEPS)
    return state if mesh is None else replicate(state, mesh)


def run_steps(step, state, mesh, batches):
    metrics = {}
    for batch in batches:
        batch = shard_batch(batch, mesh) if mesh is not None else jnp.asarray(batch)
        state, metrics = step(state, batch)
    return state, metrics


def final_leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.model, state.ema))]


def train(mesh, batches):
    step = make_train_step(tiny_loss, CONFIG, total_steps=STEPS, mesh=mesh)
    state, metrics = run_steps(step, placed_state(mesh), mesh, batches)
    return final_leaves(state), {k: float(v) for k, v in metrics.items()}


def flat(leaves):
    return np.concatenate([x.ravel() for x in leaves])


if sys.argv[1] == "sharded":
    assert jax.device_count() == 8
    batches = tiny_batches(STEPS, batch=16)
    single, m1 = train(None, batches)
    sharded, m8 = train(make_mesh(), batches)
    diff = np.max(np.abs(flat(single) - flat(sharded)))
    metric_diff = max(abs(m1[k] - m8[k]) for k in m1)
    print(f"RESULT {diff:.3e} {metric_diff:.3e} {len(m1)} {len(m8)}")
elif sys.argv[1] == "resume":
    assert jax.device_count() == 8
    directory = sys.argv[2]
    batches = tiny_batches(STEPS, batch=16)
    mesh = make_mesh()
    step = make_train_step(tiny_loss, CONFIG, total_steps=STEPS, mesh=mesh)
    uninterrupted, _ = run_steps(step, placed_state(mesh), mesh, batches)
    half, _ = run_steps(step, placed_state(mesh), mesh, batches[: STEPS // 2])
    save_checkpoint(directory, half, metadata={})
    template = placed_state(mesh)
    restored, _ = restore_checkpoint(directory, template)
    replicated = NamedSharding(mesh, P())
    arrays = [x for x in jax.tree_util.tree_leaves(restored) if isinstance(x, jax.Array)]
    placed = all(
        x.sharding.is_equivalent_to(replicated, x.ndim)
        and x.sharding.is_fully_replicated
        and len(x.sharding.device_set) == 8
        for x in arrays
    )
    restored_step = int(restored.step)
    resumed, _ = run_steps(step, restored, mesh, batches[STEPS // 2 :])  # donates `restored`
    identical = all(
        np.array_equal(a, b)
        for a, b in zip(final_leaves(uninterrupted), final_leaves(resumed), strict=True)
    )
    print(f"RESULT {restored_step} {int(placed)} {int(identical)} {len(arrays)}")
else:
    rank, port, out = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank
    )
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    # Each process passes its own half of every global batch.
    local = [b[rank * 4 : (rank + 1) * 4] for b in tiny_batches(STEPS, batch=8)]
    leaves, _ = train(make_mesh(), local)
    np.save(out, flat(leaves))
    jax.distributed.shutdown()
