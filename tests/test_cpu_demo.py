"""The CPU demonstration script runs end to end at a tiny size on the shared Omniglot subsets."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from tests.conftest import shared_path

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "cpu_demo.py"


def test_cpu_demo_trains_evaluates_and_writes_its_figures(tmp_path):
    data_dir = shared_path("data", "omniglot")
    spec = importlib.util.spec_from_file_location("cpu_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    sys.modules["cpu_demo"] = demo  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(demo)
    config = demo.DemoConfig(
        data_dir=data_dir, out_dir=str(tmp_path), minutes=0.01, batch_size=2, dit_hidden=32,
        dit_depth=1, samples=2, sampling_steps=2, guidance_scales=(1.0, 2.0),
    )  # fmt: skip
    demo.main(config)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_classes"] == 39 and metrics["steps"] >= 1
    for run in ("w=1", "w=2", "null_context", "shuffled_supports"):
        assert 0.0 <= metrics[run]["accuracy"] <= 1.0
        assert metrics[run]["support_distance_median"] > 0.0
        assert np.isfinite(metrics[run]["kid_pixels"])
    # the real support drawings are far better than chance under the same classifier
    assert metrics["support_accuracy"] > 5 * metrics["chance"]
    assert (tmp_path / "samples.png").stat().st_size > 0
    generated = np.load(tmp_path / "generated.npz")
    assert generated["w=2"].shape == (39, 2, 1, 28, 28)
