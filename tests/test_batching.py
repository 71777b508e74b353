"""The padded batch runner: any batch size gives one call's result, compiles once, trims padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx import batching
from fsdm_eqx.batching import index_keys, map_in_batches
from fsdm_eqx.sharding import batch_sharding, make_mesh

N = 10


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 3, 4)).astype(np.float32), np.arange(N, dtype=np.int32)


def _body(x: jax.Array, i: jax.Array) -> dict[str, jax.Array]:
    return {"scaled": x * 2.0 + 1.0, "row_max": jnp.max(x, axis=(1, 2)) + i.astype(jnp.float32)}


@pytest.mark.parametrize("batch_size", [1, 3, 4, N, 16])
def test_uneven_batches_give_one_calls_result_and_compile_once(batch_size: int) -> None:
    x, i = _inputs()
    shapes = []

    @jax.jit
    def fn(x: jax.Array, i: jax.Array) -> dict[str, jax.Array]:
        shapes.append(x.shape)  # runs once per compilation
        return _body(x, i)

    out = map_in_batches(fn, (x, i), batch_size)
    assert shapes == [(batch_size, 3, 4)]
    whole = jax.tree_util.tree_map(np.asarray, jax.jit(_body)(x, i))
    assert set(out) == {"scaled", "row_max"}
    for name in out:
        assert isinstance(out[name], np.ndarray) and out[name].shape[0] == N
        np.testing.assert_array_equal(out[name], whole[name])


def test_the_last_batch_is_padded_with_its_last_item() -> None:
    x, _ = _inputs()
    seen = []

    def fn(batch: jax.Array) -> jax.Array:
        seen.append(np.asarray(batch))
        return batch

    out = map_in_batches(fn, (x,), 4)
    assert [b.shape[0] for b in seen] == [4, 4, 4]
    np.testing.assert_array_equal(seen[-1], x[[8, 9, 9, 9]])
    np.testing.assert_array_equal(out, x)


def test_batches_are_placed_with_the_sharding() -> None:
    x, _ = _inputs()
    sharding = batch_sharding(make_mesh(jax.devices()[:1]))
    placed = []

    def fn(batch: jax.Array) -> jax.Array:
        placed.append(batch.sharding)
        return batch + 1.0

    np.testing.assert_array_equal(map_in_batches(fn, (x,), 4, sharding=sharding), x + 1.0)
    assert placed and all(s == sharding for s in placed)


def test_no_items_give_empty_outputs_of_the_right_shape() -> None:
    out = map_in_batches(
        jax.jit(_body), (np.zeros((0, 3, 4), np.float32), np.zeros(0, np.int32)), 4
    )
    assert out["scaled"].shape == (0, 3, 4) and out["scaled"].dtype == np.float32
    assert out["row_max"].shape == (0,)


def test_inputs_of_different_lengths_are_refused() -> None:
    x, i = _inputs()
    with pytest.raises(ValueError, match="same number of items"):
        map_in_batches(_body, (x, i[:-1]), 4)


def test_an_items_key_depends_on_its_index_alone() -> None:
    keys = index_keys(3, jnp.arange(5))
    alone = index_keys(3, jnp.asarray([3]))
    base = jax.random.key(3, impl="threefry2x32")
    expected = jax.random.key_data(jax.random.fold_in(base, 3))
    np.testing.assert_array_equal(jax.random.key_data(keys[3]), jax.random.key_data(alone[0]))
    np.testing.assert_array_equal(jax.random.key_data(keys[3]), expected)


@pytest.mark.parametrize("processes", [2, 3])
def test_each_process_computes_an_equal_share_and_gets_every_result(
    monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    # The processes are simulated one after the other; the gather hands back every share,
    # replayed from a first pass (the real collective runs in test_parallel_eval.py).
    x, i = _inputs()
    shares: dict[int, dict[str, np.ndarray]] = {}
    calls: dict[int, int] = {}
    monkeypatch.setattr(jax, "process_count", lambda: processes)

    def gather(local: dict[str, np.ndarray], tiled: bool) -> dict[str, np.ndarray]:
        assert tiled
        shares[rank] = local
        parts = [shares.get(r, local) for r in range(processes)]
        return jax.tree_util.tree_map(lambda *p: np.concatenate(p), *parts)

    monkeypatch.setattr(batching.multihost_utils, "process_allgather", gather)
    outs = []
    for rank in [*range(processes), *range(processes)]:  # the second pass sees every share
        monkeypatch.setattr(jax, "process_index", lambda rank=rank: rank)

        def fn(x: jax.Array, i: jax.Array, rank: int = rank) -> dict[str, jax.Array]:
            calls[rank] = calls.get(rank, 0) + 1
            return _body(x, i)

        outs.append(map_in_batches(fn, (x, i), 3))
    whole = jax.tree_util.tree_map(np.asarray, jax.jit(_body)(x, i))
    assert len(set(calls.values())) == 1  # the last share is padded to the same calls
    for out in outs[processes:]:
        for name in whole:
            np.testing.assert_array_equal(out[name], whole[name])
