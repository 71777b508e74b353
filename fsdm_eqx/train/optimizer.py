"""The optax optimiser of `OptimConfig`: clipping, AdamW per subtree, warm-up and decay."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from .._tree import top_level_name, top_level_names
from ..config import OptimConfig

_DEFAULT = "__default__"


def trainable_filter(model: PyTree, frozen: tuple[str, ...] = ()) -> PyTree[bool]:
    """True on the floating-point array leaves that are trained: all but the ``frozen`` subtrees.

    A subtree is a top-level field of the model (e.g. ``encoder``); an unknown name is an error.
    """
    fields = top_level_names(model)
    unknown = sorted(set(frozen) - set(fields))
    if unknown:
        raise ValueError(
            f"OptimConfig.frozen names {unknown}, which the model does not have; "
            f"its subtrees are {sorted(fields)}."
        )

    def is_trainable(path: tuple[object, ...], leaf: object) -> bool:
        return eqx.is_inexact_array(leaf) and top_level_name(path) not in frozen

    return jax.tree_util.tree_map_with_path(is_trainable, model)


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``config.lr``, then constant or cosine decay to 0 at ``total_steps``."""
    warmup = max(config.warmup_steps, 0)
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.lr, max(warmup, 1), max(total_steps, warmup + 1), end_value=0.0
        )
    if warmup == 0:
        return optax.constant_schedule(config.lr)
    return optax.linear_schedule(0.0, config.lr, warmup)


def make_optimizer(
    config: OptimConfig, model: PyTree, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with the run's learning-rate schedule, per-subtree factors and clipping.

    Acts on ``eqx.filter(model, trainable_filter(model, config.frozen))``.
    """
    fields = top_level_names(model)
    unknown = sorted({name for name, _ in config.lr_multipliers} - set(fields))
    if unknown:
        raise ValueError(
            f"OptimConfig.lr_multipliers names {unknown}, which the model does not have; "
            f"its subtrees are {sorted(fields)}."
        )
    schedule = learning_rate_schedule(config, total_steps)
    factors = {_DEFAULT: 1.0, **dict(config.lr_multipliers)}

    def adamw(factor: float) -> optax.GradientTransformation:
        return optax.adamw(
            lambda step: factor * schedule(step),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )

    def labels(params: PyTree) -> PyTree[str]:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: top_level_name(path) if top_level_name(path) in factors else _DEFAULT,
            params,
        )

    transforms: dict[Hashable, optax.GradientTransformation] = {
        name: adamw(factor) for name, factor in factors.items()
    }
    per_subtree = optax.multi_transform(transforms, labels)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), per_subtree)
    return per_subtree


def ema_decay_at(step: jax.Array, config: OptimConfig) -> tuple[jax.Array, jax.Array]:
    """The factor ``decay`` of ``ema <- decay * ema + (1 - decay) * model`` after optimiser step
    ``step``, and whether that step averages: 0 (a copy) before ``ema_start``, then
    ``config.ema_decay`` every ``ema_every`` steps and 1 (no change) in between.

    **Returns:** `(decay, averaged)`, a float32 scalar and a boolean scalar.
    """
    copy = step < config.ema_start
    update = jnp.logical_and(~copy, step % config.ema_every == 0)
    decay = jnp.where(copy, 0.0, jnp.where(update, config.ema_decay, 1.0))
    return decay.astype(jnp.float32), update


def ema_update(ema: PyTree, model: PyTree, step: jax.Array, config: OptimConfig) -> PyTree:
    """The EMA after optimiser step ``step``: a copy before ``ema_start``, then every
    ``ema_every`` steps ``decay * ema + (1 - decay) * model`` on the floating-point arrays."""
    decay, _ = ema_decay_at(step, config)

    def mix(e: Any, m: Any) -> Any:
        if eqx.is_inexact_array(e) and eqx.is_inexact_array(m):
            return (decay * e + (1.0 - decay) * m).astype(e.dtype)
        return e

    return jax.tree_util.tree_map(mix, ema, model)
