"""The README's library example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    samples = np.asarray(namespace["samples"])
    assert samples.shape == (4, 3, 32, 32) and np.all(np.isfinite(samples))
    assert np.isfinite(float(namespace["metrics"]["loss"]))  # type: ignore[index]
