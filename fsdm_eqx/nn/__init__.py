"""Equinox modules: attention, set encoders, posterior, denoisers and the FSDM model."""

from .attention import (
    MLP as MLP,
    MultiheadAttention as MultiheadAttention,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
    timestep_embedding as timestep_embedding,
)
from .denoiser import AbstractDenoiser as AbstractDenoiser
from .dit import (
    DIT_SIZES as DIT_SIZES,
    DiT as DiT,
    DiTBlock as DiTBlock,
    sincos_position_embedding as sincos_position_embedding,
)
from .posterior import (
    GaussianPosterior as GaussianPosterior,
    gaussian_kl as gaussian_kl,
    reparameterize as reparameterize,
)
from .vit import (
    AbstractSetEncoder as AbstractSetEncoder,
    SetViTEncoder as SetViTEncoder,
    ViTSetEncoder as ViTSetEncoder,
)
