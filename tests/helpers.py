"""Helpers shared by the tests."""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from fsdm_eqx.config import ModelConfig, model_preset


def tree_allclose(x, y, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Whether two PyTrees have the same structure and allclose leaves."""
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol) is True


def perturb_zeros(tree, seed: int = 1, scale: float = 0.05):
    """Replace every all-zero array (adaLN-Zero, zero-initialised output layers) by small noise,
    so that every layer, the context's included, reaches the output. Done in numpy, so that it
    compiles nothing."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [
        jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
        if eqx.is_inexact_array(x) and not np.any(np.asarray(x))
        else x
        for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


_SMALL_UNET = dict(
    denoiser="unet",
    unet_model_channels=32,
    unet_channel_mult=(1, 2),
    unet_num_res_blocks=1,
    unet_attention_resolutions=(16,),
    unet_num_heads=2,
    unet_dropout=0.0,
)


SMALL_UNET_ENCODER = dict(
    encoder="unet",
    unet_model_channels=32,
    unet_channel_mult=(1, 2),
    unet_num_res_blocks=1,
    unet_attention_resolutions=(16,),
    encoder_head_dim=32,
)
"""The smallest image-level UNet encoder the tests build (settings of `ModelConfig`)."""


def small_unet(base: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """The smallest FSDM with a UNet denoiser that the tests build: 32 channels, two levels of one
    residual block, attention at 16x16, no dropout; on ``base`` (the "smoke" preset by default)."""
    base = model_preset("smoke") if base is None else base
    return dataclasses.replace(base, **(_SMALL_UNET | overrides))


class RecordingSink:
    """A sink that keeps what it is given: each kind in its own list, and the order of the calls
    in ``calls`` (``(kind, step)``; a table's step is ``(name, step)``)."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[int, dict[str, np.ndarray]]] = []
        self.histograms: list[tuple[int, dict[str, np.ndarray]]] = []
        self.tables: list[tuple[int, str, list[str], list[list[float | int | str]]]] = []
        self.calls: list[tuple[str, object]] = []
        self.closed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logs.append((step, dict(metrics)))
        self.calls.append(("log", step))

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.images.append((step, images))
        self.calls.append(("images", step))

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        self.histograms.append((step, values))
        self.calls.append(("histograms", step))

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        self.tables.append((step, name, columns, rows))
        self.calls.append(("table", (name, step)))

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        self.tables.append((step, name, classes, counts.tolist()))
        self.calls.append(("confusion", (name, step)))

    def close(self) -> None:
        self.closed = True
        self.calls.append(("close", None))
