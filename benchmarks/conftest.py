"""Shared fixtures of the benchmarks: the FSDM networks they time, built once per session.

On a GPU the networks are the presets' (`paper-cifar100`: the paper's UNet; `dit-s-cifar100`:
DiT-S/2); on a CPU, narrow and shallow twins with the same image and set shapes, layer kinds,
patch sizes and conditioning, so that a shared 2-core machine runs the suite in minutes.

Compiled executables are cached under ``.cache/jax-benchmarks`` (``$FSDM_EQX_JAX_CACHE``
overrides it): a second run skips most compilation, which is never part of a timing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import pytest

from fsdm_eqx.config import ModelConfig, model_preset
from fsdm_eqx.nn import FSDM

ON_GPU = jax.default_backend() == "gpu"
PRESET_OF = {"unet": "paper-cifar100", "dit": "dit-s-cifar100"}
REDUCED_ENCODER = dict(hdim=64, encoder_depth=1, encoder_heads=2, encoder_head_dim=32,
                       encoder_mlp_dim=64)  # fmt: skip
REDUCED = {
    "unet": dict(
        unet_model_channels=32,
        unet_channel_mult=(1, 2),
        unet_num_res_blocks=1,
        unet_attention_resolutions=(16,),
        unet_num_heads=2,
    ),
    "dit": dict(dit_size=None, dit_hidden=96, dit_depth=2, dit_heads=2),
}
REDUCED_NOTE = "CPU: paper shapes (sets of 6, 3x32x32) at reduced width/depth"

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "FSDM_EQX_JAX_CACHE", str(Path(__file__).resolve().parent.parent / ".cache/jax-benchmarks")
    ),
)


def bench_model_config(denoiser: str, image_size: int | None = None) -> ModelConfig:
    """The preset of ``denoiser`` ("unet" or "dit") on a GPU; its reduced twin on a CPU, at
    ``image_size`` if given (the UNet then attends at its second level, as at 32x32)."""
    config = model_preset(PRESET_OF[denoiser])
    if ON_GPU:
        return config
    config = dataclasses.replace(config, **REDUCED_ENCODER, **REDUCED[denoiser])
    if image_size is not None:
        config = dataclasses.replace(
            config, image_size=image_size, unet_attention_resolutions=(image_size // 2,)
        )
    return config


class BenchModel(NamedTuple):
    """A benchmarked network: its configuration, the model, and whether it was reduced."""

    config: ModelConfig
    model: FSDM
    preset: str
    reduced: bool
    note: str


@pytest.fixture(scope="session")
def fsdm_model() -> Callable[..., BenchModel]:
    """``fsdm_model(denoiser, cpu_image_size=None)`` for "unet" or "dit" (see
    `bench_model_config`), each built once (in one jitted program, which is much faster than
    eager initialisation on a CPU)."""
    cache: dict[tuple[str, int | None], BenchModel] = {}

    def get(denoiser: str, cpu_image_size: int | None = None) -> BenchModel:
        if (denoiser, cpu_image_size) not in cache:
            config = bench_model_config(denoiser, cpu_image_size)
            model = eqx.filter_jit(lambda key: FSDM(config, key=key))(jax.random.key(0))
            note = "paper networks" if ON_GPU else REDUCED_NOTE
            if cpu_image_size is not None and not ON_GPU:
                note = f"CPU: reduced width/depth on {cpu_image_size}x{cpu_image_size} images"
            bench = BenchModel(config, model, PRESET_OF[denoiser], not ON_GPU, note)
            cache[denoiser, cpu_image_size] = bench
        return cache[denoiser, cpu_image_size]

    return get
