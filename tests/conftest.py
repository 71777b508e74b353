"""Test settings shared by every test module.

Strict dtype promotion and rank-promotion errors catch silent upcasts and accidental broadcasts;
the rbg PRNG halves compile time of the small models used here.
"""

import itertools
import os
import zlib
from collections.abc import Callable

import jax
import pytest
from jaxtyping import PRNGKeyArray

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


@pytest.fixture
def getkey(request: pytest.FixtureRequest) -> Callable[[], PRNGKeyArray]:
    """A function that returns a new key at each call, for tests that need some key but not a
    particular one. The keys follow from the test's id, so a test draws the same ones on every
    run."""
    root = jax.random.key(zlib.crc32(request.node.nodeid.encode()) % 2**31)
    counter = itertools.count()
    return lambda: jax.random.fold_in(root, next(counter))


@pytest.fixture(scope="session")
def step_fn():
    """The jitted training step of the tiny model of ``tests/train_fixtures.py``, compiled once
    for the whole session. (Imported here, so that the settings above precede the library.)"""
    from tests.train_fixtures import make_tiny_step

    return make_tiny_step()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
