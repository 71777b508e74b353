"""What the benchmarks measure against: the practical roofline, the device's peak, model FLOPs.

- `MatmulRoofline`: a dense N x N matmul of a given dtype, timed on the default device in the
  same run as the benchmark, between its rounds (the practical roofline: what this device, under
  its current load, achieves on the most favourable kernel of that dtype).
- `peak_flop_per_s`: the vendor's dense peak for a known GPU, else None.
- `cost_flops`: a compiled computation's FLOPs from XLA's cost analysis. XLA counts the body of a
  loop (`lax.scan`, `while_loop`) once, whatever its trip count, so a looped computation's FLOPs
  are its one-iteration count times the iterations (`loop_flops`, checked by
  `loop_body_counted_once`).
- `torch_python`: an interpreter that has torch, for the benchmarks that compare with torch.
- `record`: appends one benchmark's figures, with a description of the machine, to a JSON file
  (`benchmarks/results/<machine>.json`, or ``$FSDM_EQX_BENCHMARK_RESULTS``) that `report.py`
  turns into ``benchmarks/RESULTS.md``.

The benchmark modules import this file as ``roofline`` (pytest puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS_ENV = "FSDM_EQX_BENCHMARK_RESULTS"
TORCH_PYTHON_ENV = "FSDM_EQX_TORCH_PYTHON"
ON_GPU = jax.default_backend() == "gpu"

# Dense (no sparsity) peak FLOP/s per device, from the vendors' data sheets. float32 matmuls run
# at the TF32 rate under JAX's default precision on these GPUs, so "float32" maps to TF32 here
# and "float32-highest" to the IEEE float32 rate.
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12,
                   "float32-highest": 51e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12, "float32-highest": 67e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12, "float32-highest": 67e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12,
              "float32-highest": 19.5e12}),
)  # fmt: skip


def peak_flop_per_s(device_kind: str, dtype: str) -> float | None:
    """The dense peak FLOP/s of a known GPU for ``dtype`` (e.g. "bfloat16"), else None.

    **Arguments:**
    - `device_kind`: `jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3".
    - `dtype`: "bfloat16", "float16", "float32" (TF32 tensor cores, JAX's default precision) or
      "float32-highest" (IEEE float32).

    **Returns:** FLOP/s, or None for a CPU or a device not in the table.
    """
    for name, peaks in _PEAKS:
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def cost_flops(compiled: Any) -> float:
    """FLOPs of a compiled computation from XLA's cost analysis.

    **Arguments:**
    - `compiled`: a `jax.stages.Compiled` (``jax.jit(f).lower(...).compile()``) or Equinox's
      compiled wrapper (``eqx.filter_jit(f).lower(...).compile()``).

    **Returns:** the FLOP count (a multiply-add counts 2). Raises `RuntimeError` where the backend
    reports none.
    """
    compiled = getattr(compiled, "compiled", compiled)
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    flops = float(analysis.get("flops", 0.0)) if analysis else 0.0
    if flops <= 0:
        raise RuntimeError(
            f"XLA's cost analysis on {jax.default_backend()!r} reports no FLOP count; the FLOP "
            "ratios cannot be computed on this backend."
        )
    return flops


@functools.cache
def loop_body_counted_once() -> bool:
    """Whether XLA's cost analysis counts a loop's body once, whatever its trip count.

    Checked on a ten-step `lax.scan` of a matmul against one step: XLA's CPU and GPU cost
    analyses count the body once (jax 0.10), so a sampler's FLOPs are that count times its steps.
    """

    def chain(x: jax.Array, length: int) -> jax.Array:
        return jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=length)[0]

    x = jnp.ones((32, 32), jnp.float32)
    one, ten = (
        cost_flops(jax.jit(functools.partial(chain, length=n)).lower(x).compile()) for n in (1, 10)
    )
    return ten < 2 * one


def loop_flops(compiled: Any, trips: int) -> float:
    """FLOPs of a compiled computation whose cost lies in one loop of ``trips`` iterations
    (a sampler's steps): XLA's count, multiplied by ``trips`` where XLA counts the body once.
    Work outside the loop (the starting noise) is then counted ``trips`` times too; it is small
    next to a network evaluation."""
    flops = cost_flops(compiled)
    return flops * trips if loop_body_counted_once() else flops


def timings(fn: Callable[[], Any], rounds: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``rounds`` calls of ``fn`` (each awaited), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


class MatmulRoofline:
    """The practical roofline: a dense ``n x n`` matmul of one dtype on this device.

    Call `sample` between a benchmark's rounds (pytest-benchmark's untimed ``setup``), so that
    the matmul and the benchmark see the same machine load; `flop_per_s` is then the median
    rate over those calls, comparable with the benchmark's median. The FLOP count is XLA's,
    checked against ``2 n^3`` (so the cost analysis the ratios rest on is checked every run).

    **Arguments:**
    - `dtype`: the operands' dtype, as the benchmarked model computes in.
    - `n`: the side; by default 8192 on a GPU and 1024 on a CPU.
    """

    def __init__(self, dtype: str = "float32", n: int | None = None) -> None:
        self.dtype = dtype
        self.n = n or (8192 if ON_GPU else 1024)
        ka, kb = jax.random.split(jax.random.key(0))
        shape = (self.n, self.n)
        self._a = jax.random.normal(ka, shape, jnp.float32).astype(dtype)
        self._b = jax.random.normal(kb, shape, jnp.float32).astype(dtype)
        self._compiled = jax.jit(jnp.matmul).lower(self._a, self._b).compile()
        self.flops = cost_flops(self._compiled)
        if not np.isclose(self.flops, 2 * self.n**3, rtol=0.01):
            raise RuntimeError(f"XLA counts {self.flops:.4g} FLOPs for a {self.n}^2 matmul.")
        jax.block_until_ready(self._compiled(self._a, self._b))
        self.seconds: list[float] = []

    def sample(self) -> None:
        """Time one matmul and keep its duration."""
        self.seconds += timings(lambda: self._compiled(self._a, self._b), rounds=1, warmup=0)

    @property
    def flop_per_s(self) -> float:
        """FLOP/s over the median of the timed matmuls (five are taken if none were)."""
        if not self.seconds:
            for _ in range(5):
                self.sample()
        return self.flops / statistics.median(self.seconds)


def torch_python() -> str | None:
    """An interpreter that has torch: this one, else ``$FSDM_EQX_TORCH_PYTHON`` (by default
    ``/tmp/torchvenv/bin/python``) where it exists, else None (torch is never a dependency)."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    candidate = os.environ.get(TORCH_PYTHON_ENV, "/tmp/torchvenv/bin/python")
    return candidate if os.path.exists(candidate) else None


def device_description() -> dict[str, Any]:
    """The machine the figures come from: device kind and count, backend, versions, CPUs."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def machine_name(description: dict[str, Any] | None = None) -> str:
    """A file-name-safe name of the machine, e.g. ``cpu-2cores`` or ``nvidia-h100-80gb-hbm3-x1``."""
    d = description or device_description()
    if d["backend"] == "cpu":
        return f"cpu-{d['cpu_count']}cores"
    kind = re.sub(r"[^a-z0-9]+", "-", str(d["device_kind"]).lower()).strip("-")
    return f"{kind}-x{d['device_count']}"


def results_path() -> Path:
    """Where `record` writes: ``$FSDM_EQX_BENCHMARK_RESULTS``, else ``results/<machine>.json``."""
    override = os.environ.get(RESULTS_ENV)
    if override:
        return Path(override)
    return HERE / "results" / f"{machine_name()}.json"


def roofline_figures(flops: float, seconds: float, roofline: float, dtype: str) -> dict[str, Any]:
    """Achieved FLOP/s of ``flops`` in ``seconds``, its ratio to ``roofline`` (also as the entry's
    headline ``ratio``/``ratio_to``) and, on a known GPU, the model FLOP utilisation against the
    device's peak for ``dtype``."""
    achieved = flops / seconds
    peak = peak_flop_per_s(jax.devices()[0].device_kind, dtype)
    return {
        "gflop": flops / 1e9,
        "achieved_flop_per_s": achieved,
        "matmul_flop_per_s": roofline,
        "ratio_to_matmul": achieved / roofline,
        "peak_flop_per_s": peak,
        "mfu": achieved / peak if peak else None,
        "ratio": achieved / roofline,
        "ratio_to": f"{dtype} matmul",
    }


def record(
    benchmark: str,
    metrics: dict[str, Any],
    *,
    config: dict[str, Any] | None = None,
    note: str = "",
    path: Path | None = None,
) -> dict[str, Any]:
    """Append one benchmark's figures to the machine's JSON results file.

    The file holds ``{"machine": <device_description()>, "entries": [...]}``; each entry has the
    benchmark's name, a UTC time stamp, the figures, the configuration and a note (e.g. that the
    model was reduced to fit a CPU). `report.py` shows the latest entry of each benchmark.

    **Arguments:**
    - `benchmark`: a stable name, e.g. "train_step/unet/float32".
    - `metrics`: the figures (numbers or None); by convention ``value``/``unit`` name the headline
      throughput and ``ratio``/``ratio_to`` its comparison with the baseline of the same run.
    - `config`: the sizes the figures were measured at.
    - `note`: one line for the table.
    - `path`: the results file; by default `results_path()`.

    **Returns:** the entry written.
    """
    path = path or results_path()
    description = device_description()
    entry = {
        "benchmark": benchmark,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "metrics": metrics,
        "config": config or {},
        "note": note,
    }
    data: dict[str, Any] = {"machine": description, "entries": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RuntimeError(
                f"{path} is not valid JSON ({error}); move it away or delete it to start afresh."
            ) from error
        data["machine"] = description
    data.setdefault("entries", []).append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return entry


def publish(
    benchmark: Any,
    name: str,
    label: str,
    figures: dict[str, Any],
    *,
    config: dict[str, Any],
    note: str,
) -> dict[str, Any]:
    """`record` a benchmark's figures, add them (and ``config``) to pytest-benchmark's
    ``extra_info`` and print their `summary_line` under ``label``; returns the entry."""
    entry = record(name, figures, config=config, note=note)
    benchmark.extra_info.update(figures | {"config": config})
    print(summary_line(label, entry))
    return entry


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | jax.Array):
        return np.asarray(value).item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def summary_line(name: str, entry: dict[str, Any]) -> str:
    """One printed line of an entry's figures (for ``pytest -s``)."""
    shown = []
    for key, value in entry["metrics"].items():
        if isinstance(value, float):
            shown.append(f"{key}={value:.4g}")
        elif value is not None:
            shown.append(f"{key}={value}")
    return f"\n{name}: " + ", ".join(shown) + (f" [{entry['note']}]" if entry["note"] else "")
