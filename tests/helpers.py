"""Helpers shared by the tests."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Whether two PyTrees have the same structure and allclose leaves."""
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol) is True


def perturb_zeros(tree, seed: int = 1, scale: float = 0.05):
    """Replace every all-zero array (adaLN-Zero, zero-initialised output layers) by small noise,
    so that every layer, the context's included, reaches the output. Done in numpy, so that it
    compiles nothing."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [
        jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
        if eqx.is_inexact_array(x) and not np.any(np.asarray(x))
        else x
        for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)
