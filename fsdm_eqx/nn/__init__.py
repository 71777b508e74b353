"""Equinox modules: attention, set encoders, posterior, denoisers and the FSDM model."""

from .denoiser import AbstractDenoiser as AbstractDenoiser
