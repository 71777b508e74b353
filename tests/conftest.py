"""Test settings shared by every test module.

Strict dtype promotion and rank-promotion errors catch silent upcasts and accidental broadcasts;
the rbg PRNG halves compile time of the small models used here.
"""

import os

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_prng_impl", "rbg")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def shared_path(*parts: str) -> str:
    """A path under ``../shared``; the test skips when it is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (shared data is only on the project's machines)")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
