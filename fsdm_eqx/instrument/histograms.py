"""Histograms per parameter path: the values of each array leaf of a PyTree, for a sink to bin.

`parameter_histograms` (in `encoder`) pools a whole subtree; these keep every leaf apart, so that
one layer whose gradients or updates vanish or explode is visible on its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

__all__ = ["path_histograms"]


def path_histograms(
    tree: PyTree, prefix: str, *, max_paths: int = 64, max_values: int | None = 1 << 16
) -> dict[str, np.ndarray]:
    """The floating-point values of each array leaf of ``tree`` under its path.

    **Arguments:**
    - `tree`: parameters, gradients or updates (e.g. an `FSDM`, or its gradient).
    - `prefix`: the name before the path, e.g. ``grads`` or ``updates``.
    - `max_paths`: at most this many leaves, evenly spaced in the tree's order (the first and
      the last included), so that a deep model logs a bounded number of histograms.
    - `max_values`: keep at most this many values per leaf, an even stride through them.

    **Returns:** ``{prefix}/{path}`` (path segments joined by ``/``, e.g.
    ``grads/encoder/transformer/blocks/0/attn/qkv/weight``) to a float32 vector.
    """
    if max_paths < 1 or (max_values is not None and max_values < 1):
        raise ValueError(
            f"path_histograms(max_paths={max_paths}, max_values={max_values}) keeps nothing; "
            "both must be >= 1 (max_values may be None)."
        )
    leaves = [
        (jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(leaf, jax.Array | np.ndarray) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if len(leaves) > max_paths:
        chosen = np.unique(np.linspace(0, len(leaves) - 1, max_paths).round().astype(int))
        leaves = [leaves[i] for i in chosen]
    values = {}
    for path, leaf in leaves:
        flat = jnp.ravel(leaf).astype(jnp.float32)
        if max_values is not None and flat.size > max_values:
            flat = flat[:: -(-flat.size // max_values)]
        values[f"{prefix}/{path}"] = flat
    return {name: np.asarray(v) for name, v in jax.device_get(values).items()}
