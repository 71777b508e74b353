"""Run by the parallel tests in a fresh interpreter (device flags must precede JAX's import).

``sharded``: on 8 host-platform devices, train the tiny model a few steps with and without the
mesh and print the largest parameter difference. ``worker RANK PORT OUT``: one of two processes
of a `jax.distributed` run; writes its final parameters to OUT.
"""

import os
import sys

if sys.argv[1] == "sharded":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fsdm_eqx.config import OptimConfig
from fsdm_eqx.train import init_train_state, make_mesh, make_train_step, replicate, shard_batch
from tests.train_fixtures import TinyModel, tiny_batches, tiny_loss

CONFIG = OptimConfig(lr=1e-2, ema_start=0, ema_every=1)
STEPS = 4


def train(mesh, batches):
    state = init_train_state(
        TinyModel(jax.random.key(0)), CONFIG, key=jax.random.key(1), total_steps=STEPS
    )
    step = make_train_step(tiny_loss, CONFIG, total_steps=STEPS, mesh=mesh)
    if mesh is not None:
        state = replicate(state, mesh)
    metrics = {}
    for batch in batches:
        batch = shard_batch(batch, mesh) if mesh is not None else jnp.asarray(batch)
        state, metrics = step(state, batch)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((state.model, state.ema))]
    return leaves, {k: float(v) for k, v in metrics.items()}


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
