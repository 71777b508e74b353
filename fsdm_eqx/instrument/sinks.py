"""Where the training loop's metrics and images go: a protocol and plain JSONL/console sinks.

Sinks receive host values only (Python floats, uint8 numpy images), so they never touch JAX.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm


@runtime_checkable
class Sink(Protocol):
    """A destination of logged metrics and images."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar ``metrics`` at training step ``step``."""
        ...

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Record uint8 images of shape (height, width, channels) at ``step``."""
        ...

    def close(self) -> None:
        """Flush and release whatever the sink holds."""
        ...


def _check_image(name: str, image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"Image {name!r} has dtype {image.dtype} and shape {image.shape}; sinks take uint8 "
            "arrays of shape (height, width[, channels]) (see fsdm_eqx.instrument figures)."
        )
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"Image {name!r} has {image.shape[2]} channels; sinks take 1, 3 or 4 (HWC layout)."
        )
    return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image


def _finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


class JsonlSink:
    """Appends one JSON line per ``log`` call to ``run_dir/metrics.jsonl``; images are written as
    PNG files ``run_dir/images/<name>_<step>.png``.

    **Arguments:**
    - `run_dir`: the run's directory (created if missing).
    """

    def __init__(self, run_dir: str | pathlib.Path) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record: dict[str, float | int | str] = {"step": int(step)}
        record.update({k: _finite_or_str(float(v)) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        directory = self.run_dir / "images"
        directory.mkdir(exist_ok=True)
        for name, image in images.items():
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            pixels = _check_image(name, np.asarray(image))
            Image.fromarray(pixels).save(directory / f"{safe}_{int(step):08d}.png")

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """Prints one compact line per ``log`` call (the ``debug/`` metrics left out), through
    ``tqdm.write`` so that it does not break a progress bar."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = [f"{k} {float(v):.4g}" for k, v in metrics.items() if not k.startswith("debug/")]
        tqdm.write(f"step {int(step)} | " + " | ".join(shown))

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for name, image in images.items():
            pixels = _check_image(name, np.asarray(image))
            tqdm.write(f"step {int(step)} | image {name} {pixels.shape[1]}x{pixels.shape[0]}")

    def close(self) -> None:
        pass


class MultiSink:
    """Forwards every call to each of ``sinks`` in turn."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for sink in self.sinks:
            sink.log_images(images, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
