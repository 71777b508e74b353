"""Equinox modules: layers, attention, convolution, set encoders, posterior, denoisers and the
FSDM model."""

from .attention import (
    MultiheadAttention as MultiheadAttention,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
)
from .conv import Conv2d as Conv2d, conv2d as conv2d
from .denoiser import AbstractDenoiser as AbstractDenoiser
from .dit import (
    DIT_SIZES as DIT_SIZES,
    DiT as DiT,
    DiTBlock as DiTBlock,
    sincos_position_embedding as sincos_position_embedding,
)
from .encoder import AbstractEncoder as AbstractEncoder
from .fsdm import (
    FSDM as FSDM,
    SetContext as SetContext,
    build_denoiser as build_denoiser,
    build_encoder as build_encoder,
    count_parameters as count_parameters,
    leave_one_out_indices as leave_one_out_indices,
)
from .layers import MLP as MLP, timestep_embedding as timestep_embedding
from .posterior import (
    GaussianPosterior as GaussianPosterior,
    gaussian_kl as gaussian_kl,
    reparameterize as reparameterize,
)
from .unet import UNet as UNet, UNetSetEncoder as UNetSetEncoder
from .vit import (
    AbstractSetEncoder as AbstractSetEncoder,
    ImageTokenEncoder as ImageTokenEncoder,
    SetTokenEncoder as SetTokenEncoder,
    SetTransformerOptions as SetTransformerOptions,
    SetViTEncoder as SetViTEncoder,
    ViTSetEncoder as ViTSetEncoder,
)
