"""Data parallelism: 8 fake devices match one device; two processes end with the same parameters."""

import os
import socket
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "parallel_script.py")


def run_script(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sharded_step_matches_single_device() -> None:
    proc = run_script("sharded")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    _, param_diff, metric_diff, n1, n8 = line.split()
    assert float(param_diff) < 1e-5, line
    assert float(metric_diff) < 1e-4, line
    assert n1 == n8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_to_identical_parameters(tmp_path) -> None:
    port = str(free_port())
    outs = [str(tmp_path / f"rank{r}.npy") for r in range(2)]
    procs = [run_script("worker", str(r), port, outs[r]) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    a, b = np.load(outs[0]), np.load(outs[1])
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_restore_onto_replicated_state_continues_like_an_uninterrupted_run(tmp_path) -> None:
    proc = run_script("resume", str(tmp_path / "checkpoints"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    _, step, placed, identical, num_arrays = line.split()
    assert step == "2", line  # restored at the checkpointed step
    assert int(num_arrays) > 0
    assert placed == "1", f"restored arrays are not replicated over the 8 devices: {line}"
    assert identical == "1", f"the resumed run ends with other parameters: {line}"
