"""Norms per top-level subtree and statistics of the context, computed inside the jitted step."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._tree import top_level_name


def _float_leaves(tree: PyTree) -> list[Array]:
    return [
        leaf
        for leaf in jax.tree_util.tree_leaves(tree)
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]


def global_norm(tree: PyTree) -> Float[Array, ""]:
    """The L2 norm of all floating-point array leaves of ``tree`` together, in float32."""
    leaves = _float_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def subtree_norms(tree: PyTree, prefix: str) -> dict[str, Float[Array, ""]]:
    """``{prefix}_<field>`` for each top-level subtree of ``tree`` and ``{prefix}`` overall.

    For an `FSDM` the subtrees are its fields (encoder, posterior, denoiser); subtrees with no
    floating-point arrays (frozen or absent parts) are left out.
    """
    groups: dict[str, list[Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path and isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact):
            groups.setdefault(top_level_name(path), []).append(leaf)
    norms = {f"{prefix}_{name}": global_norm(leaves) for name, leaves in groups.items()}
    norms[prefix] = global_norm(tree)
    return norms


def context_statistics(
    context: Float[Array, "*batch d"], *, axis_name: str | None = None
) -> dict[str, Float[Array, ""]]:
    """Statistics of the batch's contexts ``c``, as the denoiser sees them, under the names of the
    W&B metrics spec.

    ``c`` is the whole context array of the batch (every set, every leave-one-out vector, every
    token), flattened:

    - ``debug/context_norm``: ``||c||_2 = sqrt(sum(c ** 2))``, the L2 norm of the whole array
      (what ``c.norm()`` gives in PyTorch); it grows with the square root of the number of
      entries, so it depends on the batch size, the set size and the context width.
    - ``debug/context_mean``: ``mean(|c|)``.
    - ``debug/context_max``: ``max(|c|)``.
    - ``debug/context_std``: ``std(c)``, the population standard deviation of the entries.
    - ``debug/context_vector_norm``: the mean over context vectors (last axis) of their L2 norm,
      independent of the batch size.
    - ``debug/context_signed_mean``: ``mean(c)``.

    Under ``shard_map`` pass the mesh axis: the statistics are then those of the whole batch
    (the shards must have equal sizes, as `shard_batch` makes them).

    **Arguments:**
    - `context`: the contexts, any shape ending in the context width.
    - `axis_name`: the mesh axis the batch is split over, or None.

    **Returns:** the six statistics, float32 scalars.
    """
    context = context.astype(jnp.float32)
    sum_sq = jnp.sum(jnp.square(context))
    moments = {
        "vector_norm": jnp.mean(jnp.linalg.norm(context, axis=-1)),
        "mean": jnp.mean(context),
        "mean_abs": jnp.mean(jnp.abs(context)),
        "mean_sq": jnp.mean(jnp.square(context)),
    }
    largest = jnp.max(jnp.abs(context))
    if axis_name is not None:
        moments = jax.lax.pmean(moments, axis_name)
        largest = jax.lax.pmax(largest, axis_name)
        sum_sq = jax.lax.psum(sum_sq, axis_name)
    variance = jnp.maximum(moments["mean_sq"] - jnp.square(moments["mean"]), 0.0)
    return {
        "debug/context_norm": jnp.sqrt(sum_sq),
        "debug/context_mean": moments["mean_abs"],
        "debug/context_max": largest,
        "debug/context_std": jnp.sqrt(variance),
        "debug/context_vector_norm": moments["vector_norm"],
        "debug/context_signed_mean": moments["mean"],
    }
