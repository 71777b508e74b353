"""A compiled function over many inputs in batches of one fixed shape, so it compiles once.

The evaluation protocols (features, generation, likelihood, the probe) all run a jitted, vmapped
function over thousands of items: `map_in_batches` pads the last batch to the common size,
optionally splits every batch over a device mesh, overlaps the device work of one batch with
copying back the previous one, and trims the padding. In a multi-process run (`jax.distributed`)
each process computes one contiguous share of the items on its own devices and every process gets
all the results back. `index_keys` gives item ``i`` a key that depends on ``i`` alone, so results
do not depend on the batch size, the devices or the number of processes.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding
from jaxtyping import Array, Integer, Key, PyTree, Shaped

__all__ = ["index_keys", "map_in_batches"]


def index_keys(seed: int, indices: Integer[Array, " b"]) -> Key[Array, " b"]:
    """The key of each item: ``fold_in(key(seed), i)`` of the threefry PRNG.

    Threefry's bits do not change under `jax.vmap` (rbg's do), whatever the default
    implementation, so an item's randomness depends neither on its batch nor on its place in it.

    **Arguments:**
    - `seed`: the seed of the base key.
    - `indices`: the item indices.

    **Returns:** one threefry key per index.
    """
    base = jax.random.key(seed, impl="threefry2x32")
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def _pad(chunk: np.ndarray, size: int) -> np.ndarray:
    """``chunk`` with its last item repeated up to ``size`` items (always a valid input)."""
    if chunk.shape[0] == size:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - chunk.shape[0], axis=0)])


def map_in_batches(
    fn: Callable[..., PyTree[Array]],
    inputs: Sequence[Shaped[np.ndarray, "n ..."]],
    batch_size: int,
    *,
    sharding: Sharding | None = None,
) -> PyTree[np.ndarray]:
    """``fn(*inputs)`` computed ``batch_size`` items at a time, every call of the same shape.

    The last batch is padded by repeating its last item and the padded outputs are dropped, so a
    jitted ``fn`` compiles once; batch ``i + 1`` is dispatched before batch ``i`` is copied back.
    ``fn`` must treat items independently (e.g. a `jax.vmap`): padding must not change the others.

    With several processes (`jax.process_count` > 1) this is a collective that every process
    calls with the same inputs: process ``p`` computes the ``p``-th of equal contiguous shares of
    the items (the last share padded, so every process makes the same number of calls) on its
    own devices, and the shares are gathered to every process, which returns all ``n`` results
    in order, identical everywhere.

    **Arguments:**
    - `fn`: a compiled function of one batch of each input, returning a PyTree of arrays with the
      batch as their leading axis.
    - `inputs`: the arrays, all with the same number ``n`` of items along axis 0.
    - `batch_size`: items per call; with a `sharding`, rounded up to a multiple of its devices.
    - `sharding`: where each batch is placed (e.g. `fsdm_eqx.sharding.batch_sharding`, split
      over a mesh of this process's devices); default `jnp.asarray`, the default device.

    **Returns:** the outputs for all ``n`` items as numpy arrays, in the structure ``fn``
    returns.
    """
    arrays = [np.asarray(x) for x in inputs]
    if not arrays:
        raise ValueError("map_in_batches needs at least one input array.")
    n = arrays[0].shape[0]
    if any(x.shape[0] != n for x in arrays):
        sizes = [x.shape[0] for x in arrays]
        raise ValueError(f"the inputs must have the same number of items; got {sizes}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; it must be at least 1.")
    if sharding is not None:
        if not sharding.is_fully_addressable:
            raise ValueError(
                "map_in_batches places each batch on this process's devices; give a sharding "
                "over jax.local_devices(), not one spanning other processes' devices."
            )
        devices = len(sharding.device_set)
        batch_size = -(-batch_size // devices) * devices
    processes = jax.process_count()
    if processes == 1 or n == 0:
        return _map_local(fn, arrays, batch_size, sharding)
    share = -(-n // processes)
    start = jax.process_index() * share
    # Items past the end repeat the last one (a valid input); they are trimmed after the gather.
    mine = np.minimum(np.arange(start, start + share), n - 1)
    local = _map_local(fn, [x[mine] for x in arrays], batch_size, sharding)
    gathered = multihost_utils.process_allgather(local, tiled=True)
    return jax.tree_util.tree_map(lambda y: np.asarray(y)[:n], gathered)


def _map_local(
    fn: Callable[..., PyTree[Array]],
    arrays: list[np.ndarray],
    batch_size: int,
    sharding: Sharding | None,
) -> PyTree[np.ndarray]:
    """`map_in_batches` over this process's devices only."""
    n = arrays[0].shape[0]

    def place(chunk: np.ndarray) -> Array:
        return jnp.asarray(chunk) if sharding is None else jax.device_put(chunk, sharding)

    if n == 0:
        shapes = [jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype) for x in arrays]
        out = jax.eval_shape(fn, *shapes)
        return jax.tree_util.tree_map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), out)

    def fetch(out: PyTree[Array], count: int) -> PyTree[np.ndarray]:
        return jax.tree_util.tree_map(lambda y: np.asarray(y)[:count], out)

    parts: list[PyTree[np.ndarray]] = []
    pending: list[tuple[PyTree[Array], int]] = []
    for start in range(0, n, batch_size):
        batch = [place(_pad(x[start : start + batch_size], batch_size)) for x in arrays]
        pending.append((fn(*batch), min(batch_size, n - start)))
        # Dispatch is asynchronous: batch i + 1 is queued before batch i is copied back.
        if len(pending) > 1:
            parts.append(fetch(*pending.pop(0)))
    parts += [fetch(*p) for p in pending]
    return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *parts)
