"""The one conversion between 8-bit pixels and the models' range [-1, 1].

``to_float`` maps pixel ``u`` to ``(u - 127.5) / 127.5`` (float32), the input of every model,
sampler and metric. ``to_uint8`` maps back: ``(x + 1) * 127.5`` clipped to [0, 255], then
truncated as the FSDM reference quantises its samples (the FID protocol's default), or rounded to
the nearest level (``rounding="nearest"``, the figures'), which inverts ``to_float`` exactly.
"""

from typing import Literal

import numpy as np
from jaxtyping import Float, Float32, UInt8

__all__ = ["Rounding", "to_float", "to_uint8"]

Rounding = Literal["truncate", "nearest"]

_HALF = np.float32(127.5)
_INV_HALF = np.float32(1 / 127.5)
_ONE = np.float32(1.0)


def to_float(pixels: UInt8[np.ndarray, "*shape"]) -> Float32[np.ndarray, "*shape"]:
    """Map uint8 pixels 0..255 linearly onto float32 [-1, 1] as ``(u - 127.5) * (1 / 127.5)``.

    Exact at the ends (0 -> -1, 255 -> 1) and within one float32 ulp, relative, elsewhere (the
    subtraction is exact, so nothing cancels near 0); a cast and two in-place passes, faster
    than a table lookup.

    **Arguments:**
    - `pixels`: uint8 images, any shape.

    **Returns:** float32 values in [-1, 1], same shape.
    """
    out = np.asarray(pixels).astype(np.float32)
    out -= _HALF
    out *= _INV_HALF
    return out


def to_uint8(
    images: Float[np.ndarray, "*shape"], *, rounding: Rounding = "truncate"
) -> UInt8[np.ndarray, "*shape"]:
    """Quantise images in [-1, 1] to uint8 pixels: ``(x + 1) * 127.5`` clipped to [0, 255].

    **Arguments:**
    - `images`: float images, any shape; NaN becomes 0.
    - `rounding`: ``"truncate"`` (default) drops the fraction, computed in float32 as the FSDM
      reference's ``uint8(clip((x + 1) * 127.5, 0, 255))``: the FID protocol quantises
      generated images so. ``"nearest"`` rounds (half to even) in float64: `to_float`'s exact
      inverse, used for figures.

    **Returns:** the uint8 pixels, same shape.
    """
    if rounding == "truncate":
        x = np.asarray(images, dtype=np.float32)
        scaled = (np.where(np.isnan(x), -_ONE, x) + _ONE) * _HALF
    elif rounding == "nearest":
        x = np.asarray(images, dtype=np.float64)
        scaled = np.round((np.where(np.isnan(x), -1.0, x) + 1.0) * 127.5)
    else:
        raise ValueError(f"rounding={rounding!r} is not allowed; choose 'truncate' or 'nearest'.")
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)
