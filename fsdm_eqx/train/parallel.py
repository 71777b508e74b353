"""Data parallelism: one ``data`` mesh axis over every device of every host.

Parameters are replicated; a batch is split along its first axis. The same code runs on one CPU,
on host-platform fake devices and on many GPUs across hosts (after ``initialize_distributed``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Join a multi-host run when the environment describes one (a no-op otherwise).

    ``jax.distributed.initialize()`` discovers the coordinator on SLURM / TPU / Kubernetes
    clusters by itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` on every host.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None and "SLURM_JOB_ID" not in os.environ:
        return
    if address is None:
        jax.distributed.initialize()
        return
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-d mesh with axis ``data`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array of ``tree`` on all devices of ``mesh``; every host passes the same."""
    sharding = NamedSharding(mesh, P())

    def place(x: object) -> object:
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(
                sharding, np.asarray(jax.random.key_data(x))
            )
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(place, tree)


def shard_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Assemble the global batch from each host's local part, split along axis 0 over ``data``.

    Each host passes its own ``local_batch``; the global batch size is the sum over hosts and must
    divide evenly over the devices.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def place(x: np.ndarray | jax.Array) -> jax.Array:
        global_size = x.shape[0] * jax.process_count()
        if global_size % mesh.size:
            raise ValueError(
                f"A global batch of {global_size} does not split over {mesh.size} devices; "
                f"choose a batch size divisible by {mesh.size}."
            )
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(place, local_batch)
