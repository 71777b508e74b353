"""fsdm_eqx: few-shot diffusion models in JAX and Equinox."""

from . import data as data, diffusion as diffusion, metrics as metrics, nn as nn
from .config import (
    DataConfig as DataConfig,
    DiffusionConfig as DiffusionConfig,
    EvalConfig as EvalConfig,
    ModelConfig as ModelConfig,
    RunConfig as RunConfig,
)

__version__ = "0.1.0"
