"""PyTree helpers: the top-level subtree a leaf belongs to."""

import jax
from jaxtyping import PyTree


def top_level_name(path: tuple[object, ...]) -> str:
    """The name of the top-level field, key or index that a key path starts with."""
    if not path:
        return ""
    key = path[0]
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def top_level_names(tree: PyTree) -> set[str]:
    """The names of the top-level subtrees of ``tree`` (empty ones included)."""
    paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {top_level_name(path) for path, _ in paths}
