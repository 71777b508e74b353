"""Data parallelism's placements: one ``data`` mesh axis, parameters replicated, batches split.

Training places its state and batches with these over every device of every host
(`fsdm_eqx.train.parallel` re-exports them); evaluation uses them over the local devices.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]

DATA_AXIS = "data"


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-d mesh with axis ``data`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first axis over the ``data`` axis of ``mesh``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays copied whole onto every device of ``mesh``."""
    return NamedSharding(mesh, P())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array of ``tree`` on all devices of ``mesh``; every host passes the same."""
    sharding = replicated_sharding(mesh)

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
    sharding = batch_sharding(mesh)

    def place(x: np.ndarray | jax.Array) -> jax.Array:
        global_size = x.shape[0] * jax.process_count()
        if global_size % mesh.size:
            raise ValueError(
                f"A global batch of {global_size} does not split over {mesh.size} devices; "
                f"choose a batch size divisible by {mesh.size}."
            )
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(place, local_batch)
