"""Where the training loop's metrics, images, histograms and tables go: a protocol and plain
JSONL/console sinks.

Sinks receive host values only (Python floats, uint8 numpy images, numpy arrays of raw values),
so they never touch JAX.
"""

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

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        """Record the distribution of each array of raw ``values`` at ``step`` (the sink bins
        them with `histogram`)."""
        ...

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        """Record a table ``name`` of ``rows`` (one value per column) at ``step``."""
        ...

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        """Record a confusion matrix of integer ``counts`` (row: true class, column: predicted
        class, both in the order of ``classes``) at ``step``."""
        ...

    def close(self) -> None:
        """Flush and release whatever the sink holds."""
        ...


HISTOGRAM_BINS = 64
"""Bins of every logged histogram (W&B's default)."""


def histogram(
    name: str, values: np.ndarray, bins: int = HISTOGRAM_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Bin the finite entries of ``values`` into ``bins`` equal bins over their range.

    **Arguments:**
    - `name`: what the values are, for the error message.
    - `values`: any real array (flattened); NaN and infinities are left out.
    - `bins`: the number of bins.

    **Returns:** `(counts, edges)`: int64 counts of shape `(bins,)` and float64 edges of shape
    `(bins + 1,)`, as `numpy.histogram` gives them. With no finite value all counts are zero.
    """
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(
        array
    ):
        raise ValueError(
            f"Histogram {name!r} has dtype {array.dtype}; sinks take arrays of real numbers."
        )
    flat = array.astype(np.float64).ravel()
    finite = flat[np.isfinite(flat)]
    counts, edges = np.histogram(finite, bins=bins)
    return counts.astype(np.int64), edges


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _check_table(name: str, columns: list[str], rows: list[list[float | int | str]]) -> None:
    for index, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(
                f"Table {name!r} row {index} has {len(row)} values for {len(columns)} columns "
                f"{columns}; give one value per column."
            )


def check_image(name: str, image: np.ndarray) -> np.ndarray:
    """``image`` as a uint8 (height, width[, 3 or 4]) array, or a ValueError naming ``name``."""
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


def confusion_table(
    classes: list[str], counts: np.ndarray
) -> tuple[list[str], list[list[float | int | str]]]:
    """A confusion matrix as table columns and rows: ``["true", *classes]`` and, per true class,
    its name followed by the counts of each predicted class."""
    matrix = np.asarray(counts)
    if matrix.shape != (len(classes), len(classes)) or not np.issubdtype(matrix.dtype, np.integer):
        raise ValueError(
            f"A confusion matrix of {len(classes)} classes needs integer counts of shape "
            f"({len(classes)}, {len(classes)}); got {matrix.dtype} {matrix.shape}."
        )
    rows: list[list[float | int | str]] = [
        [name, *(int(v) for v in row)] for name, row in zip(classes, matrix, strict=True)
    ]
    return ["true", *classes], rows


def _finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


class JsonlSink:
    """Appends one JSON line per ``log`` call to ``run_dir/metrics.jsonl``; images are written as
    PNG files ``run_dir/images/<name>_<step>.png``, histograms as ``counts`` and ``edges`` in
    ``run_dir/histograms/<name>_<step>.npz`` and tables as ``{"columns": ..., "rows": ...}`` in
    ``run_dir/tables/<name>_<step>.json`` (``/`` and other odd characters of names become ``_``).

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
            pixels = check_image(name, np.asarray(image))
            Image.fromarray(pixels).save(directory / f"{_safe_name(name)}_{int(step):08d}.png")

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        for name, array in values.items():
            self.save_histogram(name, *histogram(name, array), step)

    def save_histogram(self, name: str, counts: np.ndarray, edges: np.ndarray, step: int) -> None:
        """Write one histogram already binned by `histogram`."""
        directory = self.run_dir / "histograms"
        directory.mkdir(exist_ok=True)
        path = directory / f"{_safe_name(name)}_{int(step):08d}.npz"
        np.savez(path, counts=counts, edges=edges)

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        _check_table(name, columns, rows)
        directory = self.run_dir / "tables"
        directory.mkdir(exist_ok=True)
        cells = [[_finite_or_str(v) if isinstance(v, float) else v for v in row] for row in rows]
        path = directory / f"{_safe_name(name)}_{int(step):08d}.json"
        path.write_text(json.dumps({"columns": list(columns), "rows": cells}), encoding="utf-8")

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        columns, rows = confusion_table(classes, counts)
        self.log_table(name, columns, rows, step)

    def close(self) -> None:
        self._file.close()


class NullSink:
    """Discards everything: the sink of processes other than 0, and of runs that log nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        pass

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        pass

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        pass

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleSink(NullSink):
    """Prints one compact line per ``log`` call (the ``debug/`` metrics left out), through
    ``tqdm.write`` so that it does not break a progress bar; histograms and tables are left to
    the other sinks."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = [f"{k} {float(v):.4g}" for k, v in metrics.items() if not k.startswith("debug/")]
        tqdm.write(f"step {int(step)} | " + " | ".join(shown))

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for name, image in images.items():
            pixels = check_image(name, np.asarray(image))
            tqdm.write(f"step {int(step)} | image {name} {pixels.shape[1]}x{pixels.shape[0]}")


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

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        for sink in self.sinks:
            sink.log_histograms(values, step)

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        for sink in self.sinks:
            sink.log_table(name, columns, rows, step)

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        for sink in self.sinks:
            sink.log_confusion_matrix(name, classes, counts, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
