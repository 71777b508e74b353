"""Turn the benchmarks' JSON results into the markdown table ``benchmarks/RESULTS.md``.

Each ``benchmarks/results/<machine>.json`` (written by `roofline.record`) becomes one section:
the machine it came from, then one row per benchmark (its latest entry) with the throughput, the
achieved FLOP/s, the ratio to the baseline measured in the same run and, on a known GPU, the
model FLOP utilisation against the device's peak.

Run: ``python benchmarks/report.py [RESULTS.json ...] [--out PATH]`` (by default every file in
``benchmarks/results/`` and ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

HEADER = """# Benchmark results

Written by `benchmarks/report.py` from `benchmarks/results/*.json` (`nox -s benchmark` runs the
suites and then this script). Each row is the latest run of one benchmark. *Ratio* compares the
benchmark with its baseline measured in the same run on the same device: for FLOP rates, a dense
matmul of the same dtype timed between the benchmark's rounds (the practical roofline); for
Inception against torch, the same network in torch; for the set sampler, the rate at which one
H100 consumes sets at the paper configuration. *MFU* is the achieved FLOP/s over the device's
dense peak for the dtype, on known GPUs only. FLOPs are XLA's cost analysis of the compiled
computation (a multiply-add counts 2).
"""

CPU_WARNING = (
    "**CPU figures.** Measured on a shared CPU machine while other jobs were running: the "
    "figures are noisy (see the load average of each row) and the networks are reduced (see "
    "*Size*); they show that the suite runs and how the code compares with the matmul roofline on "
    "this CPU, not the throughput of the paper configuration, which needs a GPU."
)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if 1e3 <= abs(value) < 1e9:
            return f"{value:,.0f}"
        if 1e-3 <= abs(value) < 1e3 or not value:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}e}"
    return str(value)


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP/s"


DETAILS = {  # secondary figures shown beside the headline, when an entry has them
    "steps_per_s": "{:.3g} steps/s",
    "gflop": "{:.3g} GFLOP per call",
    "step_over_standalone": "a sampler step takes {:.3g}x a standalone network evaluation",
    "torch_images_per_s": "torch {:.3g} images/s",
}


def _details(metrics: dict[str, Any]) -> str:
    shown = [form.format(metrics[k]) for k, form in DETAILS.items() if metrics.get(k) is not None]
    return "; ".join(shown) or "-"


def latest_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last entry of each benchmark, sorted by the benchmarks' names."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        latest[entry["benchmark"]] = entry
    return sorted(latest.values(), key=lambda e: e["benchmark"])


def machine_section(data: dict[str, Any], source: str) -> str:
    """The markdown section of one results file."""
    m = data["machine"]
    cpu = m.get("backend") == "cpu"
    title = f"{m['device_kind']} x{m['device_count']}"
    if cpu:
        title = f"CPU ({m.get('cpu_count')} cores)"
    lines = [
        f"## {title}",
        "",
        f"Source: `{source}`. Device: {m['device_kind']} x{m['device_count']} "
        f"({m['backend']}); {m.get('cpu_count')} CPUs ({m.get('processor')}); "
        f"jax {m.get('jax')}, Python {m.get('python')}.",
        "",
    ]
    if cpu:
        lines += [CPU_WARNING, ""]
    lines += [
        "| Benchmark | Throughput | Achieved | Ratio | Baseline | MFU | Size | Details "
        "| Measured (UTC, load) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in latest_entries(data.get("entries", [])):
        x = entry["metrics"]
        value = f"{_number(x.get('value'))} {x.get('unit', '')}".strip()
        ratio = _number(x.get("ratio"))
        mfu = x.get("mfu")
        load = entry.get("load_average_1min")
        when = entry["time"].replace("T", " ").removesuffix("+00:00")
        lines.append(
            f"| `{entry['benchmark']}` | {value} | {_flops(x.get('achieved_flop_per_s'))} | "
            f"{ratio} | {x.get('ratio_to', '-')} | "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {entry.get('note') or '-'} | "
            f"{_details(x)} | {when}, {_number(load, 2)} |"
        )
    return "\n".join(lines) + "\n"


def render(paths: list[Path]) -> str:
    """RESULTS.md's text for the results files at ``paths`` (files that are not results, such as
    pytest-benchmark's own JSON, are left out)."""
    sections = []
    for path in sorted(paths):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "entries" not in data or "machine" not in data:
            continue
        try:
            source = str(path.resolve().relative_to(HERE.parent))
        except ValueError:
            source = str(path)
        sections.append(machine_section(data, source))
    if not sections:
        raise SystemExit(
            f"No benchmark results found in {', '.join(map(str, paths)) or HERE / 'results'}; "
            "run `nox -s benchmark` (or pytest on benchmarks/) first."
        )
    return HEADER + "\n" + "\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    """Write RESULTS.md from the results files."""
    parser = argparse.ArgumentParser(description="Write benchmarks/RESULTS.md from JSON results.")
    parser.add_argument("results", nargs="*", type=Path, help="results JSON files")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown file")
    args = parser.parse_args(argv)
    paths = args.results or sorted((HERE / "results").glob("*.json"))
    text = render(paths)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
