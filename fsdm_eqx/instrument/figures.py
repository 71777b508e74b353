"""Figures as uint8 RGB arrays ``(H, W, 3)``, ready for `Sink.log_images` and `write_png`.

Images come in channels first, in [-1, 1] (the models' range), with 1 or 3 channels; a pixel value
``v`` becomes ``round((v + 1) / 2 * 255)``, clipped to [0, 255] (`to_rgb`). Grids place each image
in a cell with a border of ``pad`` pixels, drawn in the image's frame colour, or black when it has
none. `rows_figure` and `samples_figure` instead take uint8 pixels the caller quantised (the run's
``samples.png`` shows the pixels the FID protocol scores) and lay them out on white. Heat maps use
a matplotlib colormap object directly, so no pyplot state is touched.
"""

from collections.abc import Sequence
from pathlib import Path

import jax
import matplotlib
import numpy as np
from jaxtyping import Array, Float, UInt8

from ..data.pixels import to_uint8

RGB = tuple[int, int, int]
RED: RGB = (255, 0, 0)
GREEN: RGB = (0, 255, 0)
BLUE: RGB = (0, 0, 255)
WHITE: RGB = (255, 255, 255)
BACKGROUND: RGB = (0, 0, 0)

Images = Float[np.ndarray, "n c h w"] | Float[Array, "n c h w"]
Support = Float[np.ndarray, "m c h w"] | Float[Array, "m c h w"]
Real = Float[np.ndarray, "k c h w"] | Float[Array, "k c h w"]
Tile = UInt8[np.ndarray, "h w 3"]


def to_rgb(images: Images) -> UInt8[np.ndarray, "n h w 3"]:
    """Images in [-1, 1], channels first (1 or 3 channels), as uint8 RGB, channels last.

    **Arguments:**
    - `images`: `(n, c, h, w)` with `c` 1 (grey, repeated to RGB) or 3.

    **Returns:** `round((x + 1) / 2 * 255)` clipped to [0, 255] (`to_uint8` rounding to the
    nearest level), `(n, h, w, 3)`; NaN gives 0.
    """
    x = np.asarray(jax.device_get(images))
    _check_channels(x.shape)
    return _rgb_tiles(to_uint8(x, rounding="nearest"))


def _check_channels(shape: tuple[int, ...]) -> None:
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ValueError(
            f"images must have 1 or 3 channels (channels first, (n, c, h, w)), got shape "
            f"{shape}; transpose channels-last images with .transpose(0, 3, 1, 2)."
        )


def _rgb_tiles(pixels: UInt8[np.ndarray, "n c h w"]) -> UInt8[np.ndarray, "n h w 3"]:
    """uint8 images, channels first, 1 (repeated) or 3 channels, as RGB tiles."""
    if pixels.shape[1] == 1:
        pixels = np.repeat(pixels, 3, axis=1)
    return pixels.transpose(0, 2, 3, 1)


def _check_colour(colour: RGB) -> RGB:
    if len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
        raise ValueError(f"a frame colour is an (r, g, b) triple of 0..255, got {colour!r}.")
    return colour


def tile_rows(
    rows: Sequence[Sequence[tuple[Tile, RGB | None]]],
    *,
    pad: int = 2,
    background: RGB = BACKGROUND,
) -> UInt8[np.ndarray, "H W 3"]:
    """Lay out rows of equally sized uint8 tiles, each with a border of ``pad`` pixels.

    **Arguments:**
    - `rows`: for each row, its `(tile, frame colour or None)` pairs; rows may be of different
      lengths (missing cells are background).
    - `pad`: border width in pixels.
    - `background`: the colour of unframed borders and missing cells.

    **Returns:** the grid; cell `(r, c)` spans rows `r * (h + 2 pad)` to `(r + 1) * (h + 2 pad)`
    and likewise for columns, with the tile at offset `(pad, pad)`.
    """
    if pad < 0:
        raise ValueError(f"pad={pad} must be >= 0.")
    cells = [cell for row in rows for cell in row]
    if not cells:
        raise ValueError("a figure needs at least one image; got none.")
    h, w = cells[0][0].shape[:2]
    for tile, _ in cells:
        if tile.shape != (h, w, 3):
            raise ValueError(
                f"all images of a figure must have one size; got {tile.shape[:2]} and {(h, w)}."
            )
    ch, cw = h + 2 * pad, w + 2 * pad
    ncols = max(len(row) for row in rows)
    grid = np.empty((len(rows) * ch, ncols * cw, 3), np.uint8)
    grid[:] = _check_colour(background)
    for r, row in enumerate(rows):
        for c, (tile, frame) in enumerate(row):
            y, x = r * ch, c * cw
            if frame is not None:
                grid[y : y + ch, x : x + cw] = _check_colour(frame)
            grid[y + pad : y + pad + h, x + pad : x + pad + w] = tile
    return grid


def image_grid(
    images: Images,
    *,
    nrow: int,
    frames: Sequence[RGB | None] | None = None,
    pad: int = 2,
) -> UInt8[np.ndarray, "H W 3"]:
    """A grid of images, ``nrow`` to a row (as torchvision's `make_grid`), optionally framed.

    **Arguments:**
    - `images`: `(n, c, h, w)` in [-1, 1], 1 or 3 channels.
    - `nrow`: images per row.
    - `frames`: one `(r, g, b)` colour or None per image, drawn as its border.
    - `pad`: border width in pixels.

    **Returns:** the uint8 RGB grid `(rows * (h + 2 pad), nrow * (w + 2 pad), 3)`.
    """
    if nrow < 1:
        raise ValueError(f"nrow={nrow} must be >= 1 (images per row).")
    tiles = to_rgb(images)
    if frames is None:
        frames = [None] * len(tiles)
    if len(frames) != len(tiles):
        raise ValueError(f"got {len(frames)} frames for {len(tiles)} images; give one per image.")
    cells = list(zip(tiles, frames, strict=True))
    return tile_rows([cells[i : i + nrow] for i in range(0, len(cells), nrow)], pad=pad)


def heatmap(
    values: Float[np.ndarray, "h w"] | Float[Array, "h w"],
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    scale: int = 1,
) -> UInt8[np.ndarray, "H W 3"]:
    """Colour a 2-D array with a matplotlib colormap.

    **Arguments:**
    - `values`: the array.
    - `vmin`, `vmax`: the values mapped to the ends of the colormap (default: the array's
      minimum and maximum); values outside are clipped, a constant array maps to the low end.
    - `cmap`: a matplotlib colormap name.
    - `scale`: each value becomes a `scale x scale` block of pixels.

    **Returns:** uint8 RGB `(h * scale, w * scale, 3)`: the colormap's 8-bit colour at
    `(v - vmin) / (vmax - vmin)`.
    """
    v = np.asarray(jax.device_get(values), dtype=np.float64)
    if scale < 1:
        raise ValueError(f"scale={scale} must be >= 1.")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"cmap={cmap!r} is not a matplotlib colormap; try 'viridis' or 'magma'.")
    finite = v[np.isfinite(v)]
    data_lo, data_hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    lo = data_lo if vmin is None else float(vmin)
    hi = data_hi if vmax is None else float(vmax)
    span = hi - lo
    unit = np.zeros_like(v) if span <= 0 else np.clip((np.nan_to_num(v, nan=lo) - lo) / span, 0, 1)
    rgb = matplotlib.colormaps[cmap](unit, bytes=True)[..., :3]
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def support_target_figure(
    x_set: Images, target_index: int, *, pad: int = 2
) -> UInt8[np.ndarray, "H W 3"]:
    """One training set in a row: the target image framed red, the support images blue.

    **Arguments:**
    - `x_set`: the set `(ns, c, h, w)` in [-1, 1].
    - `target_index`: the image denoised from the others' context.
    - `pad`: frame width.

    **Returns:** the uint8 RGB figure.
    """
    ns = int(x_set.shape[0])
    if not 0 <= target_index < ns:
        raise ValueError(f"target_index={target_index} is outside the set of {ns} images.")
    frames = [RED if i == target_index else BLUE for i in range(ns)]
    return image_grid(x_set, nrow=ns, frames=frames, pad=pad)


def _row(
    images: Float[np.ndarray, "n c h w"] | Float[Array, "n c h w"], frame: RGB
) -> list[tuple[Tile, RGB | None]]:
    return [(tile, frame) for tile in to_rgb(images)]


def generation_figure(
    support: Support, generated: Images, *, pad: int = 2
) -> UInt8[np.ndarray, "H W 3"]:
    """The support images (framed blue) in the top row, generated images (green) below.

    **Arguments:**
    - `support`: `(m, c, h, w)` in [-1, 1], the images the context was computed from.
    - `generated`: `(n, c, h, w)` in [-1, 1], the samples.
    - `pad`: frame width.

    **Returns:** the uint8 RGB figure, as wide as the longer row.
    """
    return tile_rows([_row(support, BLUE), _row(generated, GREEN)], pad=pad)


def rows_figure(rows: Sequence[UInt8[np.ndarray, "_k c h w"]]) -> UInt8[np.ndarray, "H W c"]:
    """Rows of uint8 images on white, 2 pixels apart and 2 pixels from the edges.

    **Arguments:**
    - `rows`: one uint8 array `(k, c, h, w)` per row, channels first, `c` 1 or 3; rows may hold
      different numbers `k`.

    **Returns:** one uint8 image, channels last, with the images' channels (grey stays one
    channel), as wide as the longest row.
    """
    for row in rows:
        _check_channels(row.shape)
    cells = [[(tile, None) for tile in _rgb_tiles(row)] for row in rows]
    grid = tile_rows(cells, pad=1, background=WHITE)
    grid = np.pad(grid, ((1, 1), (1, 1), (0, 0)), constant_values=255)
    # Nothing is coloured, so a grey image's three channels are equal: keep one.
    return grid[..., : rows[0].shape[1]]


def samples_figure(
    support: UInt8[np.ndarray, "s m c h w"], generated: UInt8[np.ndarray, "s k c h w"]
) -> UInt8[np.ndarray, "H W c"]:
    """For each set, its support images in a row over the images generated from it."""
    return rows_figure([row for pair in zip(support, generated, strict=True) for row in pair])


def write_png(path: str | Path, image: UInt8[np.ndarray, "H W c"]) -> None:
    """Write a uint8 image, channels last (one channel is written as grey)."""
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(array).save(path)


def fid_eval_figure(
    support: Support, generated: Images, real: Real, *, pad: int = 2
) -> UInt8[np.ndarray, "H W 3"]:
    """Three rows from one few-shot FID episode: support (blue), generated (green), real (red).

    **Arguments:**
    - `support`: `(m, c, h, w)`, the conditioning images of an unseen class.
    - `generated`: `(n, c, h, w)`, samples given that support.
    - `real`: `(k, c, h, w)`, held-out images of the same class.
    - `pad`: frame width.

    **Returns:** the uint8 RGB figure, as wide as the longest row.
    """
    return tile_rows([_row(support, BLUE), _row(generated, GREEN), _row(real, RED)], pad=pad)


def maps_figure(
    images: Images,
    maps: Float[np.ndarray, "m gh gw"] | Float[Array, "m gh gw"],
    *,
    cmap: str = "viridis",
    pad: int = 2,
) -> UInt8[np.ndarray, "H W 3"]:
    """Images in the top row and a heat map of each below, on one colour scale.

    **Arguments:**
    - `images`: `(m, c, h, w)` in [-1, 1].
    - `maps`: `(m, gh, gw)`, one map per image on a grid that divides the image (patch grids
      are enlarged to the image size).
    - `cmap`: the colormap.
    - `pad`: border width.

    **Returns:** the uint8 RGB figure; the colour scale runs from the smallest to the largest
    value over all maps.
    """
    tiles = to_rgb(images)
    values = np.asarray(jax.device_get(maps), dtype=np.float64)
    m, h, w = tiles.shape[:3]
    if values.shape[0] != m or h % values.shape[1] or w % values.shape[2]:
        raise ValueError(
            f"maps of shape {values.shape} do not fit {m} images of {h}x{w}: give one map per "
            "image on a grid that divides the image size."
        )
    if values.shape[1] * w != values.shape[2] * h:
        raise ValueError(f"maps {values.shape[1:]} and images {(h, w)} differ in aspect.")
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scale = h // values.shape[1]
    heat = [heatmap(v, vmin=lo, vmax=hi, cmap=cmap, scale=scale) for v in values]
    return tile_rows([[(t, None) for t in tiles], [(t, None) for t in heat]], pad=pad)
