"""Evaluation over two `jax.distributed` processes gives every process the one-process result."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "parallel_eval_script.py")
TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(runs: dict[str, list[str]], logs: pathlib.Path) -> None:
    """Run the script once per entry, all at once; fail on the first error or on the timeout
    (a process whose peer failed waits forever in a collective) with the stderr of each."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = {}
    for name, args in runs.items():
        with open(logs / f"{name}.log", "w") as err:
            procs[name] = subprocess.Popen(
                [sys.executable, SCRIPT, *args], stdout=err, stderr=subprocess.STDOUT, env=env
            )
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs.values()]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = {name: p.returncode for name, p in procs.items() if p.returncode != 0}
    report = "\n".join(
        f"--- {name} (exit {code}):\n{(logs / f'{name}.log').read_text()[-3000:]}"
        for name, code in failed.items()
    )
    assert not failed, f"evaluation processes failed or timed out after {TIMEOUT} s:\n{report}"


def test_two_processes_evaluate_like_one(tmp_path: pathlib.Path) -> None:
    (tmp_path / "single").mkdir()
    single = str(tmp_path / "single" / "out.npz")
    port = str(free_port())
    outs = [str(tmp_path / f"rank{r}.npz") for r in range(2)]  # one shared reference cache
    runs = {"single": ["single", single]}
    runs |= {f"rank{r}": ["worker", str(r), port, outs[r]] for r in range(2)}
    run_all(runs, tmp_path)
    reference = np.load(single)
    expected = json.loads(str(reference["results"]))
    assert reference["samples"].shape == (13, 3, 3, 4, 4)
    assert expected["fid"]["num_generated"] == 33 and expected["likelihood"]["num_images"] == 28
    for rank, out in enumerate(outs):
        got = np.load(out)
        # The samples of a set depend on its index only, not on which process made them.
        np.testing.assert_array_equal(got["samples"], reference["samples"], err_msg=f"rank {rank}")
        assert json.loads(str(got["results"])) == expected, f"rank {rank}"
    assert len(list((tmp_path / "reference").iterdir())) == 1  # written once, by process 0
