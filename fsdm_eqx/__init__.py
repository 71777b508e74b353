"""fsdm_eqx: few-shot diffusion models in JAX and Equinox."""

from . import diffusion as diffusion
from .config import DiffusionConfig as DiffusionConfig

__version__ = "0.1.0"
