"""Checkpoints: round trip, keep-last-K, atomic writes, clear errors on bad files."""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fsdm_eqx.train.checkpoint as checkpoint_module
from fsdm_eqx.config import OptimConfig
from fsdm_eqx.train import (
    CheckpointError,
    DamagedCheckpointError,
    TrainState,
    init_train_state,
    latest_checkpoint,
    read_checkpoint_metadata,
    restore_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from tests.train_fixtures import TinyModel

OPTIM = OptimConfig(lr=1e-3, ema_start=0, ema_every=1)


def _leaves(state: TrainState) -> list[np.ndarray]:
    state = jax.tree_util.tree_map(
        lambda x: (
            jax.random.key_data(x)
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x
        ),
        state,
    )
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state) if eqx.is_array(x)]


def _at_step(state: TrainState, step: int) -> TrainState:
    return eqx.tree_at(lambda s: s.step, state, jnp.asarray(step, jnp.int32))


@pytest.fixture(scope="module")
def state() -> TrainState:
    key = jax.random.key(3)
    state = init_train_state(TinyModel(key), OPTIM, key=jax.random.fold_in(key, 1), total_steps=10)
    # Make the EMA and the optimiser state differ from the model, so a mix-up would show.
    ema = jax.tree_util.tree_map(lambda x: x * 0.5 if eqx.is_inexact_array(x) else x, state.ema)
    opt_state = jax.tree_util.tree_map(
        lambda x: x + 0.25 if eqx.is_inexact_array(x) else x, state.opt_state
    )
    return TrainState(state.model, ema, opt_state, jnp.asarray(7, jnp.int32), state.key)


def test_round_trip_is_exact(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={"run_config": {"seed": 0}, "splits": [1]})
    assert path == tmp_path / "step_00000007"
    restored, metadata = restore_checkpoint(tmp_path, like=state)
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(state.key)
    assert np.array_equal(jax.random.normal(restored.key, (3,)), jax.random.normal(state.key, (3,)))
    assert metadata["step"] == 7 and metadata["splits"] == [1]
    assert metadata["run_config"] == {"seed": 0}
    assert len(metadata["state_sha256"]) == 64


def test_keeps_the_last_k(state, tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, _at_step(state, step), metadata={}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000004", "step_00000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    restored, _ = restore_checkpoint(tmp_path, like=state)
    assert int(restored.step) == 5


def test_crash_during_save_keeps_the_previous_checkpoint(state, tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _at_step(state, 1), metadata={})

    def crash(f, tree):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.eqx, "tree_serialise_leaves", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _at_step(state, 2), metadata={})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    # A process killed mid-write leaves its temporary directory behind: it is never picked.
    partial = tmp_path / ".tmp-step_00000002-999"
    partial.mkdir()
    (partial / "state.eqx").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    restored, _ = restore_checkpoint(tmp_path, like=state)
    assert int(restored.step) == 1
    save_checkpoint(tmp_path, _at_step(state, 2), metadata={})
    assert not partial.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_saving_the_same_step_again_replaces_it(state, tmp_path):
    save_checkpoint(tmp_path, state, metadata={"version": 1})
    save_checkpoint(tmp_path, state, metadata={"version": 2})
    _, metadata = restore_checkpoint(tmp_path, like=state)
    assert metadata["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000007"]


def _one_sentence(error: pytest.ExceptionInfo[CheckpointError], path: pathlib.Path) -> str:
    message = str(error.value)
    assert str(path) in message and "\n" not in message and message.endswith(".")
    return message


def test_corrupt_state_file(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={})
    data = bytearray((path / "state.eqx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "state.eqx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(path, like=state)
    assert "corrupt" in _one_sentence(error, path / "state.eqx")


def test_truncated_state_file(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={})
    data = (path / "state.eqx").read_bytes()
    (path / "state.eqx").write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(tmp_path, like=state)
    assert "truncated" in _one_sentence(error, path / "state.eqx")


def test_corrupt_metadata(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={})
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(path, like=state)
    assert "corrupt" in _one_sentence(error, path / "metadata.json")
    (path / "metadata.json").write_text(json.dumps({"step": 7}))
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(path, like=state)
    assert "checksum" in _one_sentence(error, path / "metadata.json")


def test_run_directory_skips_damaged_checkpoints_naming_them(state, tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _at_step(state, step), metadata={})
    truncated = tmp_path / "step_00000003" / "state.eqx"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    garbled = tmp_path / "step_00000002" / "metadata.json"
    data = bytearray(garbled.read_bytes())
    data[1:5] = b"}{!x"
    garbled.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as caught:
        assert resumable_checkpoint(tmp_path) == tmp_path / "step_00000001"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and str(truncated) in messages[0] and str(garbled) in messages[1]
    assert all("resuming from the older" in m and "step_00000001" in m for m in messages)
    with pytest.warns(UserWarning, match="damaged"):
        restored, _ = restore_checkpoint(tmp_path, like=state)
    assert int(restored.step) == 1
    # The damaged checkpoint itself is one error naming the file and what to do.
    with pytest.raises(DamagedCheckpointError) as error:
        restore_checkpoint(tmp_path / "step_00000002", like=state)
    assert "delete it" in _one_sentence(error, garbled)


def test_only_damaged_checkpoints_are_one_error(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={})
    (path / "state.eqx").write_bytes((path / "state.eqx").read_bytes()[:-10])
    with pytest.raises(CheckpointError) as error:
        resumable_checkpoint(tmp_path)
    message = _one_sentence(error, path / "state.eqx")
    assert "only damaged checkpoints" in message and "delete them" in message
    with pytest.raises(CheckpointError, match="only damaged checkpoints"):
        restore_checkpoint(tmp_path, like=state)


def test_metadata_of_another_step_is_damaged(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={})
    assert read_checkpoint_metadata(path)["step"] == 7
    meta = path / "metadata.json"
    meta.write_text(meta.read_text().replace('"step": 7', '"step": 9'))
    with pytest.raises(DamagedCheckpointError) as error:
        read_checkpoint_metadata(path)
    assert "records step 9" in _one_sentence(error, meta)


def test_checkpoint_of_an_older_format_is_one_error(state, tmp_path):
    path = save_checkpoint(tmp_path, state, metadata={})
    meta = path / "metadata.json"
    meta.write_text(meta.read_text().replace('"format_version": 2', '"format_version": 1'))
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(path, like=state)
    assert "format 1" in _one_sentence(error, path / "state.eqx")


def test_incompatible_model(state, tmp_path, getkey):
    path = save_checkpoint(tmp_path, state, metadata={})
    key = getkey()
    wider = TinyModel(key, context_dim=5)
    other = init_train_state(wider, OPTIM, key=key, total_steps=10)
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(tmp_path, like=other)
    message = _one_sentence(error, path / "state.eqx")
    assert "incompatible" in message and "(3, 4)" in message and "(5, 4)" in message


def test_no_checkpoint(state, tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(CheckpointError) as error:
        restore_checkpoint(tmp_path, like=state)
    assert "no complete checkpoint" in _one_sentence(error, tmp_path)
