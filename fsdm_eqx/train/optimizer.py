"""The optax optimiser of `OptimConfig`: clipping, AdamW per subtree, warm-up and decay.

The decays of `OptimConfig.lr_schedule` that depend only on the step count (cosine, step) live in
`learning_rate_at`; reduce-on-plateau is optax's `contrib.reduce_on_plateau` on the training loss,
whose scale multiplies that learning rate.
"""

from collections.abc import Hashable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

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


class ScheduleState(NamedTuple):
    """The learning-rate schedule's part of the optimiser state.

    ``count`` is the number of updates applied (a skipped non-finite step leaves it alone), and
    ``horizon`` the step at which a cosine decay reaches 0. Both live in the state, so that the
    learning rate a step logs is the one it applies, and a resumed run keeps its schedule.
    """

    count: Int[Array, ""]  # pyright: ignore[reportIncompatibleMethodOverride] (optax's name)
    horizon: Int[Array, ""]


def schedule_horizon(config: OptimConfig, total_steps: int) -> int:
    """The horizon a run of ``total_steps`` steps records: ``total_steps`` for a cosine decay,
    0 for a constant schedule, whose learning rate no run length changes."""
    return total_steps if config.lr_schedule == "cosine" else 0


def learning_rate_at(
    config: OptimConfig, count: Int[ArrayLike, ""], horizon: Int[ArrayLike, ""]
) -> Float[Array, ""]:
    """The learning rate of the update after ``count`` applied ones: a linear warm-up from 0 to
    ``config.lr`` over ``config.warmup_steps``, then ``config.lr``, a cosine decay that
    reaches 0 at ``horizon``, or a step decay by ``config.lr_decay_factor`` every
    ``config.lr_decay_every`` updates. Without warm-up the first update gets the full
    ``config.lr``. A `plateau` schedule's reductions are not included (see
    `current_learning_rate`).
    """
    count_f = jnp.asarray(count).astype(jnp.float32)
    peak = jnp.asarray(config.lr, jnp.float32)
    warmup = config.warmup_steps
    after = peak
    if config.lr_schedule == "cosine":
        span = jnp.maximum(jnp.asarray(horizon).astype(jnp.float32) - warmup, 1.0)
        progress = jnp.clip((count_f - warmup) / span, 0.0, 1.0)
        after = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    elif config.lr_schedule == "step":
        decays = jnp.floor(jnp.maximum(count_f - warmup, 0.0) / config.lr_decay_every)
        after = peak * jnp.asarray(config.lr_decay_factor, jnp.float32) ** decays
    if warmup == 0:
        return after
    return jnp.where(count_f < warmup, peak * count_f / warmup, after)


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``config.lr``, then constant or cosine decay to 0 at ``total_steps``:
    `learning_rate_at` as a function of the number of applied updates."""
    horizon = schedule_horizon(config, total_steps)
    return lambda count: learning_rate_at(config, count, horizon)


def scale_by_schedule_state(config: OptimConfig, horizon: int) -> optax.GradientTransformation:
    """Scale updates by ``-learning_rate_at(config, count, horizon)``, with the count and the
    horizon kept in a `ScheduleState` (``horizon`` only initialises it)."""

    def init(params: PyTree) -> ScheduleState:
        del params
        return ScheduleState(jnp.zeros((), jnp.int32), jnp.asarray(horizon, jnp.int32))

    def update(
        updates: PyTree, state: ScheduleState, params: PyTree | None = None
    ) -> tuple[PyTree, ScheduleState]:
        del params
        lr = learning_rate_at(config, state.count, state.horizon)
        updates = jax.tree_util.tree_map(lambda u: u * (-lr).astype(u.dtype), updates)
        return updates, ScheduleState(state.count + 1, state.horizon)

    return optax.GradientTransformation(init, update)  # pyright: ignore[reportArgumentType]


def find_schedule_state(opt_state: optax.OptState) -> ScheduleState | None:
    """The `ScheduleState` inside an optimiser state of `make_optimizer`, or None if it has
    none."""
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))
    found = [node for node in nodes if isinstance(node, ScheduleState)]
    return found[0] if found else None


def plateau_scale(opt_state: optax.OptState) -> Float[Array, ""]:
    """The factor by which reduce-on-plateau has scaled the learning rate so far (1 without a
    `plateau` schedule)."""
    nodes = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)
    )
    found = [n for n in nodes if isinstance(n, optax.contrib.ReduceLROnPlateauState)]
    return jnp.asarray(found[0].scale, jnp.float32) if found else jnp.ones((), jnp.float32)


def current_learning_rate(config: OptimConfig, opt_state: optax.OptState) -> Float[Array, ""]:
    """The base learning rate (before `lr_multipliers`) that the next update of ``opt_state``
    applies, read from its own count, horizon and plateau scale."""
    schedule = find_schedule_state(opt_state)
    if schedule is None:
        raise ValueError(
            "The optimiser state has no learning-rate schedule state; build it with "
            "`make_optimizer` or `init_train_state`."
        )
    return learning_rate_at(config, schedule.count, schedule.horizon) * plateau_scale(opt_state)


def applied_learning_rate(
    config: OptimConfig, before: optax.OptState, after: optax.OptState
) -> Float[Array, ""]:
    """The base learning rate of the update that took the optimiser state ``before`` to
    ``after``: the schedule at the count before it, times the plateau scale it applied."""
    schedule = find_schedule_state(before)
    if schedule is None:
        return current_learning_rate(config, before)  # raises the readable error
    return learning_rate_at(config, schedule.count, schedule.horizon) * plateau_scale(after)


def make_optimizer(
    config: OptimConfig, model: PyTree, total_steps: int
) -> optax.GradientTransformationExtraArgs:
    """AdamW with the run's learning-rate schedule, per-subtree factors and clipping.

    Acts on ``eqx.filter(model, trainable_filter(model, config.frozen))``. The schedule is one
    transformation at the end of the chain (`scale_by_schedule_state`), so the state holds one
    count of applied updates and the schedule's horizon, `schedule_horizon(config,
    total_steps)`; ``total_steps`` only matters when the state is initialised. A `plateau`
    schedule adds optax's reduce-on-plateau last, so ``update`` then needs the step's training
    loss as ``value=``.
    """
    fields = top_level_names(model)
    unknown = sorted({name for name, _ in config.lr_multipliers} - set(fields))
    if unknown:
        raise ValueError(
            f"OptimConfig.lr_multipliers names {unknown}, which the model does not have; "
            f"its subtrees are {sorted(fields)}."
        )
    factors = {_DEFAULT: 1.0, **dict(config.lr_multipliers)}

    def adamw_direction(factor: float) -> optax.GradientTransformation:
        # optax.adamw without its learning rate: Adam, decoupled weight decay, the factor.
        return optax.chain(
            optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
            optax.add_decayed_weights(config.weight_decay),
            optax.scale(factor),
        )

    def labels(params: PyTree) -> PyTree[str]:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: top_level_name(path) if top_level_name(path) in factors else _DEFAULT,
            params,
        )

    transforms: dict[Hashable, optax.GradientTransformation] = {
        name: adamw_direction(factor) for name, factor in factors.items()
    }
    chain = [
        optax.multi_transform(transforms, labels),
        scale_by_schedule_state(config, schedule_horizon(config, total_steps)),
    ]
    if config.grad_clip > 0:
        chain.insert(0, optax.clip_by_global_norm(config.grad_clip))
    if config.lr_schedule == "plateau":
        chain.append(
            optax.contrib.reduce_on_plateau(
                factor=config.lr_decay_factor,
                patience=config.plateau_patience,
                accumulation_size=config.plateau_window,
            )
        )
    return optax.chain(*chain)


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
