"""Pixels <-> [-1, 1]: every 8-bit level against numpy written out per value, both quantisers."""

import jaxtyping
import numpy as np
import pytest

from fsdm_eqx.data.pixels import to_float, to_uint8

LEVELS = np.arange(256, dtype=np.uint8)


def _reference_truncation(values: np.ndarray) -> np.ndarray:
    """The FSDM reference's quantiser, one value at a time: float32 (x + 1) * 127.5, clamped,
    truncated toward zero (torch's ``.to(torch.uint8)``)."""
    out = []
    for v in values.reshape(-1):
        scaled = (np.float32(v) + np.float32(1.0)) * np.float32(127.5)
        out.append(0 if scaled <= 0 else 255 if scaled >= 255 else int(scaled))
    return np.asarray(out, np.uint8).reshape(values.shape)


def test_every_level_maps_linearly_onto_minus_one_one() -> None:
    x = to_float(LEVELS.reshape(4, 1, 8, 8))
    assert x.dtype == np.float32 and x.shape == (4, 1, 8, 8)
    expected = np.arange(256, dtype=np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(x.reshape(-1), expected, rtol=1.2e-7, atol=0)
    assert x.min() == -1.0 and x.max() == 1.0


def test_nearest_rounding_inverts_to_float_for_every_level() -> None:
    np.testing.assert_array_equal(to_uint8(to_float(LEVELS), rounding="nearest"), LEVELS)


def test_truncation_matches_the_reference_per_value() -> None:
    x = np.array([-1.0, 1.0, 0.0, -1 + 1.99 / 127.5, 2.0, -3.0], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 255, 127, 1, 255, 0])
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-1.2, 1.2, 2000), to_float(LEVELS)]).astype(np.float32)
    got = to_uint8(values.reshape(-1, 2, 2))
    assert got.dtype == np.uint8 and got.shape == (values.size // 4, 2, 2)
    np.testing.assert_array_equal(got.reshape(-1), _reference_truncation(values))


def test_truncation_of_the_levels_lowers_some_by_at_most_one() -> None:
    lowered = LEVELS.astype(int) - to_uint8(to_float(LEVELS)).astype(int)
    assert set(np.unique(lowered).tolist()) <= {0, 1}


@pytest.mark.parametrize("rounding", ["truncate", "nearest"])
def test_nan_and_infinities_are_clipped(rounding: str) -> None:
    x = np.array([np.nan, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(to_uint8(x, rounding=rounding), [0, 255, 0])


def test_unknown_rounding_is_refused() -> None:
    # the run-time type checker of the tests rejects it first; without one, a ValueError does
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        to_uint8(np.zeros(2, np.float32), rounding="floor")  # type: ignore[arg-type]
