"""Data parallelism: one ``data`` mesh axis over every device of every host.

Parameters are replicated; a batch is split along its first axis. The same code runs on one CPU,
on host-platform fake devices and on many GPUs across hosts (after ``initialize_distributed``).
The mesh and placements live in `fsdm_eqx.sharding` (evaluation uses them too) and are
re-exported here.
"""

import os

import jax

from ..sharding import (
    DATA_AXIS as DATA_AXIS,
    batch_sharding as batch_sharding,
    make_mesh as make_mesh,
    replicate as replicate,
    replicated_sharding as replicated_sharding,
    shard_batch as shard_batch,
)


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
