"""Figures: the [-1, 1] -> uint8 mapping, grid layout, frame colours, heat-map colours and the
sample grids of uint8 pixels."""

import jax.numpy as jnp
import jaxtyping
import matplotlib
import numpy as np
import pytest

from fsdm_eqx.instrument import (
    fid_eval_figure,
    generation_figure,
    heatmap,
    image_grid,
    maps_figure,
    support_target_figure,
)
from fsdm_eqx.instrument.figures import BLUE, GREEN, RED, rows_figure, samples_figure, to_rgb

H, W = 4, 5


def _images(n: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, c, H, W)).astype(np.float32)


def _reference_pixels(images: np.ndarray) -> np.ndarray:
    """The mapping written out per pixel: v -> round((v + 1) * 255 / 2), clipped, HWC RGB."""
    out = np.zeros((images.shape[0], H, W, 3), np.uint8)
    for i, image in enumerate(images):
        for y in range(H):
            for x in range(W):
                for k in range(3):
                    v = float(image[k if image.shape[0] == 3 else 0, y, x])
                    out[i, y, x, k] = min(255, max(0, round((v + 1.0) * 255 / 2)))
    return out


def _cell(grid: np.ndarray, r: int, c: int, pad: int) -> np.ndarray:
    ch, cw = H + 2 * pad, W + 2 * pad
    return grid[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw]


def _border(cell: np.ndarray, pad: int) -> np.ndarray:
    mask = np.ones(cell.shape[:2], bool)
    mask[pad:-pad, pad:-pad] = False
    return cell[mask]


def test_value_mapping_is_exact():
    values = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0, 0.25], np.float32)
    image = np.broadcast_to(values[None, None, None, :], (1, 3, 1, 8))
    got = to_rgb(image)[0, 0, :, 0]
    # (v + 1) * 127.5: 0, 63.75, 127.5, 191.25, 255, 382.5 -> 255, -255 -> 0, 159.375
    np.testing.assert_array_equal(got, [0, 64, 128, 191, 255, 255, 0, 159])
    images = _images(3)
    np.testing.assert_array_equal(to_rgb(images), _reference_pixels(images))
    grey = _images(2, c=1)
    np.testing.assert_array_equal(to_rgb(jnp.asarray(grey)), _reference_pixels(grey))
    assert to_rgb(np.full((1, 1, 2, 2), np.nan, np.float32)).max() == 0


@pytest.mark.parametrize("pad", [0, 2])
def test_grid_layout_and_frames(pad):
    images = _images(5)
    frames = [RED, None, BLUE, GREEN, None]
    grid = image_grid(images, nrow=3, frames=frames, pad=pad)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (H + 2 * pad), 3 * (W + 2 * pad), 3)
    pixels = _reference_pixels(images)
    for i in range(5):
        cell = _cell(grid, i // 3, i % 3, pad)
        np.testing.assert_array_equal(cell[pad : pad + H, pad : pad + W], pixels[i])
        if pad:
            border = _border(cell, pad)
            expected = (0, 0, 0) if frames[i] is None else frames[i]
            assert np.all(border == np.array(expected, np.uint8))
    assert np.all(_cell(grid, 1, 2, pad) == 0)  # the sixth cell is empty background


def test_support_target_figure_frames():
    x_set = _images(4)
    fig = support_target_figure(x_set, 2, pad=1)
    assert fig.shape == (H + 2, 4 * (W + 2), 3)
    for i in range(4):
        cell = _cell(fig, 0, i, 1)
        assert np.all(_border(cell, 1) == np.array(RED if i == 2 else BLUE, np.uint8))
        np.testing.assert_array_equal(cell[1:-1, 1:-1], _reference_pixels(x_set)[i])
    with pytest.raises(ValueError, match="target_index=4"):
        support_target_figure(x_set, 4)


def test_generation_and_fid_figures_rows():
    support, generated, real = _images(3, seed=1), _images(5, seed=2), _images(2, seed=3)
    fig = generation_figure(support, generated, pad=2)
    assert fig.shape == (2 * (H + 4), 5 * (W + 4), 3)
    for row, (images, colour) in enumerate(((support, BLUE), (generated, GREEN))):
        for i in range(len(images)):
            cell = _cell(fig, row, i, 2)
            assert np.all(_border(cell, 2) == np.array(colour, np.uint8))
            np.testing.assert_array_equal(cell[2:-2, 2:-2], _reference_pixels(images)[i])
    assert np.all(_cell(fig, 0, 3, 2) == 0) and np.all(_cell(fig, 0, 4, 2) == 0)

    fig = fid_eval_figure(support, generated, real, pad=1)
    assert fig.shape == (3 * (H + 2), 5 * (W + 2), 3)
    rows = ((support, BLUE), (generated, GREEN), (real, RED))
    for row, (images, colour) in enumerate(rows):
        for i in range(len(images)):
            cell = _cell(fig, row, i, 1)
            assert np.all(_border(cell, 1) == np.array(colour, np.uint8))
            np.testing.assert_array_equal(cell[1:-1, 1:-1], _reference_pixels(images)[i])
    assert np.all(_cell(fig, 2, 2, 1) == 0)


def test_heatmap_uses_the_colormap_exactly():
    values = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, -1.0]])
    rgb = heatmap(values, vmin=0.0, vmax=4.0, cmap="magma", scale=2)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    lut = matplotlib.colormaps["magma"]
    for (y, x), v in np.ndenumerate(values):
        expected = lut(float(np.clip(v / 4.0, 0.0, 1.0)), bytes=True)[:3]
        assert np.all(rgb[2 * y : 2 * y + 2, 2 * x : 2 * x + 2] == np.array(expected, np.uint8))
    # default range: the data's minimum and maximum are the colormap's ends
    default = heatmap(values)
    viridis = matplotlib.colormaps["viridis"]
    assert tuple(default[1, 2]) == viridis(0.0, bytes=True)[:3]
    assert tuple(default[1, 1]) == viridis(1.0, bytes=True)[:3]
    assert tuple(default[0, 0]) == viridis(1 / 5, bytes=True)[:3]
    constant = heatmap(np.full((2, 2), 3.0))
    assert np.all(constant == np.array(viridis(0.0, bytes=True)[:3], np.uint8))


def test_maps_figure_layout():
    images = _images(2)[:, :, :4, :4]
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]])
    fig = maps_figure(images, maps, pad=1)
    assert fig.shape == (2 * 6, 2 * 6, 3)
    lut = matplotlib.colormaps["viridis"]
    for i in range(2):
        np.testing.assert_array_equal(fig[1:5, 6 * i + 1 : 6 * i + 5], to_rgb(images)[i])
        for (y, x), v in np.ndenumerate(maps[i]):
            block = fig[7 + 2 * y : 9 + 2 * y, 6 * i + 1 + 2 * x : 6 * i + 3 + 2 * x]
            assert np.all(block == np.array(lut(v / 7.0, bytes=True)[:3], np.uint8))
    with pytest.raises(ValueError, match="one map per image"):
        maps_figure(images, maps[:1])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        image_grid(np.zeros((2, 2, H, W), np.float32), nrow=2)
    with pytest.raises(ValueError, match="one per image"):
        image_grid(_images(3), nrow=2, frames=[RED])
    with pytest.raises(ValueError, match="nrow=0"):
        image_grid(_images(3), nrow=0)
    # the run-time type checker of the tests rejects it first; without one, a ValueError does
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        generation_figure(_images(2), np.zeros((2, 3, H + 1, W), np.float32))
    with pytest.raises(ValueError, match="colormap"):
        heatmap(np.zeros((2, 2)), cmap="no-such-map")


@pytest.mark.parametrize("c", [1, 3])
def test_rows_figure_lays_pixels_on_white_two_pixels_apart(c: int) -> None:
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (k, c, H, W), dtype=np.uint8) for k in (3, 1)]
    fig = rows_figure(rows)
    assert fig.shape == (2 * (H + 2) + 2, 3 * (W + 2) + 2, c) and fig.dtype == np.uint8
    expected = np.full(fig.shape, 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = 2 + i * (H + 2), 2 + j * (W + 2)
            expected[y : y + H, x : x + W] = image.transpose(1, 2, 0)
    np.testing.assert_array_equal(fig, expected)
    support, generated = rows[0][None, :2], rows[0][None, 2:]
    np.testing.assert_array_equal(
        samples_figure(support, generated), rows_figure([support[0], generated[0]])
    )
