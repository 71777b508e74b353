"""The W&B sink: what goes to `wandb` (against a fake run), the mode it picks, the fallback when
the server is unreachable, and a real offline training run read back from the files W&B wrote."""

import json
import pathlib
import socket
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
import wandb
from PIL import Image
from wandb.proto import wandb_internal_pb2

from fsdm_eqx.config import RunConfig
from fsdm_eqx.instrument import (
    ConsoleSink,
    JsonlSink,
    MultiSink,
    NullSink,
    Visuals,
    WandbSink,
    make_sink,
    wandb_sink as wandb_sink_module,
)
from fsdm_eqx.instrument.sinks import histogram
from fsdm_eqx.instrument.wandb_sink import resolve_mode
from fsdm_eqx.train import train
from tests.train_fixtures import fresh_state, loop_batch

NUM_STEPS = 6
FAKE_KEY = "0123456789abcdef" * 2 + "01234567"


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No W&B variables or credentials from the machine; W&B's own folders in ``tmp_path``."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent_netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    yield monkeypatch
    wandb.teardown()


class FakeRun:
    def __init__(self, directory: pathlib.Path, fail: bool = False) -> None:
        self.dir = str(directory / "offline-run-fake" / "files")
        self.url = "https://wandb.example/runs/fake"
        self.fail = fail
        self.logged: list[tuple[int, dict[str, object]]] = []
        self.finished = False

    def log(self, values, step):
        if self.fail:
            raise RuntimeError("the server said no")
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


class FakeInit:
    """Stands in for ``wandb.init``: records its arguments; fails online when asked to."""

    def __init__(self, directory: pathlib.Path, fail_online=False, fail_log=False) -> None:
        self.directory, self.fail_online, self.fail_log = directory, fail_online, fail_log
        self.calls: list[dict[str, object]] = []
        self.runs: list[FakeRun] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail_online and kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying: connection refused")
        self.runs.append(FakeRun(self.directory, fail=self.fail_log))
        return self.runs[-1]


def test_sink_sends_each_kind_to_wandb_and_keeps_a_local_copy(wandb_env, tmp_path, capsys):
    fake = FakeInit(tmp_path)
    wandb_env.setattr(wandb, "init", fake)
    config = {"run": {"num_steps": 6}, "model": {"encoder": "vit"}}
    sink = WandbSink(
        tmp_path / "run", project="p", name="n", config=config, mode="online", init_timeout=7.0
    )
    assert sink.mode == "online" and len(fake.calls) == 1
    call = fake.calls[0]
    assert call["project"] == "p" and call["name"] == "n" and call["config"] == config
    assert call["mode"] == "online" and call["dir"] == str(tmp_path / "run")
    assert call["settings"].init_timeout == 7.0
    assert (tmp_path / "run" / "wandb_run_id").read_text() == call["id"]

    image = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    values = np.random.default_rng(1).normal(size=100)
    sink.log({"loss": 0.5, "debug/grad_norm": 2.0}, 3)
    sink.log_images({"generation/set_0": image}, 3)
    sink.log_histograms({"params/encoder": values}, 3)
    sink.log_table("fid/per_class", ["class", "fid"], [["apple", 12.5]], 3)
    sink.log_confusion_matrix("Val/confusion_matrix", ["a", "b"], np.array([[2, 1], [0, 3]]), 3)
    sink.close()
    run = fake.runs[0]
    assert run.finished and [step for step, _ in run.logged] == [3, 3, 3, 3, 3]
    assert run.logged[0][1] == {"loss": 0.5, "debug/grad_norm": 2.0}
    sent_image = run.logged[1][1]["generation/set_0"]
    assert isinstance(sent_image, wandb.Image)
    assert np.array_equal(np.asarray(sent_image.image), image)
    sent_histogram = run.logged[2][1]["params/encoder"]
    counts, edges = histogram("params/encoder", values)
    assert isinstance(sent_histogram, wandb.Histogram)
    assert sent_histogram.histogram == counts.tolist() and sent_histogram.bins == edges.tolist()
    sent_table = run.logged[3][1]["fid/per_class"]
    assert isinstance(sent_table, wandb.Table)
    assert sent_table.columns == ["class", "fid"] and sent_table.data == [["apple", 12.5]]
    confusion = run.logged[4][1]
    chart_table = confusion["Val/confusion_matrix"].table
    cells = {(row[0], row[1]): row[2] for row in chart_table.data}  # (actual, predicted, n)
    assert cells[("a", "a")] == 2 and cells[("a", "b")] == 1 and cells[("b", "b")] == 3
    assert cells.get(("b", "a"), 0) == 0
    assert confusion["Val/confusion_matrix/counts"].data == [["a", 2, 1], ["b", 0, 3]]

    local = tmp_path / "run"
    lines = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "loss": 0.5, "debug/grad_norm": 2.0}]
    assert np.array_equal(
        np.asarray(Image.open(local / "images/generation_set_0_00000003.png")), image
    )
    assert (local / "histograms/params_encoder_00000003.npz").is_file()
    assert (local / "tables/fid_per_class_00000003.json").is_file()
    err = capsys.readouterr().err
    assert err.count("W&B run: https://wandb.example/runs/fake") == 1


def test_unreachable_server_falls_back_and_log_errors_do_not_stop(wandb_env, tmp_path, capsys):
    fake = FakeInit(tmp_path, fail_online=True, fail_log=True)
    wandb_env.setattr(wandb, "init", fake)
    sink = WandbSink(tmp_path / "run", project="p", name="n", config={}, mode="online")
    assert sink.mode == "offline"
    assert [c["mode"] for c in fake.calls] == ["online", "offline"]
    assert (tmp_path / "run" / "wandb_run_id").read_text() == fake.calls[1]["id"]
    err = capsys.readouterr().err
    assert err.count("could not start an online run within 30 s") == 1
    assert "CommError: Timed out while retrying" in err
    assert f"wandb sync {tmp_path / 'offline-run-fake'}" in err

    sink.log({"loss": 1.0}, 1)
    sink.log({"loss": 0.5}, 2)
    sink.log_images({"x": np.zeros((2, 2), np.uint8)}, 2)
    sink.close()
    err = capsys.readouterr().err
    assert err.count("W&B failed to log") == 1 and "metrics at step 1" in err
    assert "the server said no" in err and "W&B failed 3 times" in err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [1.0, 0.5]
    assert (tmp_path / "run" / "images" / "x_00000002.png").is_file()

    # A restarted run on the same directory continues the same W&B run.
    again = WandbSink(tmp_path / "run", project="p", name="n", config={}, mode="offline")
    again.close()
    assert fake.calls[-1]["id"] == fake.calls[1]["id"] and fake.calls[-1]["resume"] == "allow"


def test_mode_from_flag_environment_and_credentials(wandb_env, tmp_path):
    url = "https://api.example.org"
    assert resolve_mode("auto", base_url=url)[0] == "offline"
    assert "no W&B credentials" in resolve_mode("auto", base_url=url)[1]
    assert resolve_mode("online", base_url=url)[0] == "online"
    assert resolve_mode("disabled", base_url=url)[0] == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine other.example.org\n  login user\n  password secret\n")
    wandb_env.setenv("NETRC", str(netrc))
    assert resolve_mode("auto", base_url=url)[0] == "offline"
    netrc.write_text("machine api.example.org\n  login user\n  password secret\n")
    assert resolve_mode("auto", base_url=url) == ("online", "W&B credentials were found")
    wandb_env.setenv("NETRC", str(tmp_path / "absent"))
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode("auto", base_url=url)[0] == "online"
    wandb_env.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto", base_url=url) == ("offline", "WANDB_MODE=offline")
    assert resolve_mode("online", base_url=url)[0] == "offline"
    wandb_env.setenv("WANDB_MODE", "online")
    assert resolve_mode("disabled", base_url=url)[0] == "disabled"
    wandb_env.setenv("WANDB_MODE", "cloudy")
    with pytest.raises(ValueError, match="WANDB_MODE='cloudy' is not a W&B mode"):
        resolve_mode("auto", base_url=url)
    with pytest.raises(ValueError, match="W&B mode 'sometimes' is not allowed"):
        resolve_mode("sometimes", base_url=url)


def test_disabled_makes_no_run_and_other_processes_log_nothing(wandb_env, tmp_path):
    def no_init(**kwargs):
        raise AssertionError("wandb.init must not be called")

    wandb_env.setattr(wandb, "init", no_init)
    sink = WandbSink(tmp_path / "a", project="p", name="n", config={}, mode="disabled")
    sink.log({"loss": 1.0}, 1)
    sink.close()
    assert sink.mode == "disabled" and (tmp_path / "a" / "metrics.jsonl").read_text()
    wandb_env.setenv("WANDB_MODE", "disabled")
    by_environment = WandbSink(tmp_path / "b", project="p", name="n", config={})
    by_environment.close()
    assert by_environment.mode == "disabled"

    made = make_sink(RunConfig(run_dir=str(tmp_path / "c"), wandb="disabled"), name="n", config={})
    assert isinstance(made, MultiSink)
    assert [type(s) for s in made.sinks] == [ConsoleSink, JsonlSink]
    made.close()
    wandb_env.setattr(wandb_sink_module.jax, "process_index", lambda: 1)
    other = make_sink(RunConfig(run_dir=str(tmp_path / "d")), name="n", config={})
    assert isinstance(other, NullSink) and not (tmp_path / "d").exists()


# A real offline W&B run: the transaction log W&B writes (``run-<id>.wandb``) is a sequence of
# 32 KiB blocks of records, each with a 7-byte header (CRC32, length, kind: full/first/middle/last),
# after a 7-byte file header; each record is a protobuf ``wandb_internal_pb2.Record``.
_BLOCK, _HEADER = 32768, 7


def _wandb_records(path: pathlib.Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, position = [], b"", _HEADER
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _history(run_dir: pathlib.Path) -> dict[int, dict[str, object]]:
    """``{step: {key: value}}`` of every history row in the run's offline W&B log."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows: dict[int, dict[str, object]] = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


# The keys that the step and the loop must produce for the tiny two-subtree model; every other key
# the step returns is checked too, as the set of keys of one step.
REQUIRED = {
    "loss",
    "mse",
    "debug/context_norm",
    "debug/context_mean",
    "debug/context_max",
    "debug/context_std",
    "debug/context_vector_norm",
    "debug/context_signed_mean",
    "debug/grad_norm_encoder",
    "debug/grad_norm_denoiser",
    "debug/param_norm_encoder",
    "debug/param_norm_denoiser",
    "debug/grad_param_ratio_encoder",
    "debug/grad_param_ratio_denoiser",
    "debug/context_grad_norm",
    "Optim/lr",
    "Optim/update_global_norm",
    "Optim/grad_global_norm",
    "Optim/param_global_norm",
    "Optim/ema_decay",
    "system/steps_per_second",
    "system/images_per_second",
    "progress/percent_complete",
    "progress/eta_seconds",
}


def test_offline_training_run_records_every_key(wandb_env, tmp_path, step_fn, capsys):
    wandb_env.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    config = RunConfig(
        run_dir=str(run_dir),
        num_steps=NUM_STEPS,
        log_every=3,
        eval_every=3,
        save_every=0,
        sample_every=2,
        progress=False,
    )
    sink = make_sink(config, name="tiny", config={"run": {"num_steps": NUM_STEPS}})
    wandb_part = sink.sinks[1]
    assert isinstance(wandb_part, WandbSink) and wandb_part.mode == "offline"
    frame = np.zeros((6, 9, 3), np.uint8)
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = (255, 0, 0)

    def visuals_fn(state):
        weights = np.asarray(state.model.encoder.weight).ravel()
        return Visuals(
            {"encoder/rollout_set0": frame}, {"params/encoder": weights}, {"probe": 0.25}
        )

    train(
        fresh_state(),
        step_fn,
        loop_batch,
        config=config,
        sink=sink,
        eval_fn=lambda state: {"eval_loss": 1.5},
        images_fn=lambda state: {"generation/set_0": frame},
        visuals_fn=visuals_fn,
    )
    sink.log_table("fid/per_class", ["class", "fid"], [["apple", 3.0]], NUM_STEPS)
    sink.log_confusion_matrix("Val/confusion_matrix", ["a", "b"], np.eye(2, dtype=int), NUM_STEPS)
    sink.close()
    assert "wandb sync" in capsys.readouterr().err

    step_keys = set(step_fn(fresh_state(), jnp.asarray(loop_batch(0)))[1])
    rows = _history(run_dir)
    local = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for step in (3, 6):
        recorded = rows[step]
        assert REQUIRED | step_keys | {"eval_loss", "probe"} <= set(recorded)
        for line in (x for x in local if x["step"] == step):
            for key, value in line.items():
                if key != "step":
                    assert recorded[key] == pytest.approx(value, rel=1e-12), key
    assert rows[6]["progress/percent_complete"] == 100.0 and rows[6]["eval_loss"] == 1.5
    assert sorted(rows) == [2, 3, 4, 6]
    for step in (2, 4, 6):
        assert rows[step]["generation/set_0/_type"] == "image-file"
    assert rows[3]["encoder/rollout_set0/_type"] == "image-file"
    assert rows[6]["params/encoder/_type"] == "histogram"
    assert sum(rows[6]["params/encoder/values"]) == 12  # the encoder's 3x4 weights
    assert rows[6]["fid/per_class/_type"] == "table-file"
    assert rows[6]["Val/confusion_matrix_table/_type"] == "table-file"  # the chart's data
    assert rows[6]["Val/confusion_matrix/counts/_type"] == "table-file"

    (files,) = run_dir.glob("wandb/offline-run-*/files")
    logged_image = files / rows[2]["generation/set_0/path"]
    assert np.array_equal(np.asarray(Image.open(logged_image)), frame)
    table = json.loads((files / rows[6]["fid/per_class/path"]).read_text())
    assert table["columns"] == ["class", "fid"] and table["data"] == [["apple", 3.0]]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "encoder_rollout_set0_00000003.png",
        "encoder_rollout_set0_00000006.png",
        "generation_set_0_00000002.png",
        "generation_set_0_00000004.png",
        "generation_set_0_00000006.png",
    ]
    assert [p.name for p in (run_dir / "histograms").iterdir()] != []
    assert (run_dir / "tables" / "fid_per_class_00000006.json").is_file()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_run_finishes_with_local_metrics(wandb_env, tmp_path, step_fn, capsys):
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    config = RunConfig(
        run_dir=str(run_dir),
        num_steps=3,
        log_every=3,
        eval_every=0,
        save_every=0,
        progress=False,
        wandb="online",
        wandb_init_timeout=2.0,
    )
    # What W&B can hold up: starting the sink and closing it (the training in between is timed
    # apart, as its compilation depends on the machine's load).
    start = time.monotonic()
    sink = make_sink(config, name="unreachable", config={})
    started = time.monotonic()
    train(fresh_state(), step_fn, loop_batch, config=config, sink=sink)
    trained = time.monotonic()
    sink.close()
    held = (started - start) + (time.monotonic() - trained)
    assert held < 20.0, f"an unreachable W&B server held the run for {held:.1f} s"
    assert sink.sinks[1].mode == "offline"
    err = capsys.readouterr().err
    assert err.count("could not start an online run within 2 s") == 1
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3] and np.isfinite(lines[0]["loss"])
    assert 3 in _history(run_dir)
