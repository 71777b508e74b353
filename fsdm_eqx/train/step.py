"""One training step, a pure function ``(state, batch) -> (state, metrics)``.

The per-set loss is vmapped over the batch; with a mesh, the gradient and the metrics are
computed per device inside ``shard_map`` and averaged with ``pmean`` over ``data``. The optimiser
update, the EMA and the guard against non-finite values follow on the replicated parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..config import OptimConfig
from ..instrument.norms import context_statistics, global_norm, subtree_norms
from .optimizer import (
    ema_update,
    learning_rate_schedule,
    make_optimizer,
    trainable_filter,
)
from .parallel import DATA_AXIS
from .state import TrainState

LossFn = Callable[[PyTree, PyTree, PRNGKeyArray], tuple[Float[Array, ""], dict[str, Array]]]
"""``(model, example, key) -> (loss, aux)`` for one example (one set). ``aux`` holds scalars to
average over the batch, and optionally ``context`` (any shape ending in the context width), whose
statistics are reported."""

StepFn = Callable[[TrainState, PyTree], tuple[TrainState, dict[str, Array]]]

COMPUTE_DTYPES = {"float32": jnp.dtype(jnp.float32), "bfloat16": jnp.dtype(jnp.bfloat16)}


def cast_floating(tree: PyTree, dtype: DTypeLike) -> PyTree:
    """``tree`` with its floating-point arrays cast to ``dtype`` (the compute copy of a model)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _reduce_metrics(loss: Array, aux: dict[str, Array], axis_name: str | None) -> dict[str, Array]:
    metrics: dict[str, Array] = {"loss": loss}
    for name, value in aux.items():
        if name == "context":
            continue
        if value.ndim != 1:
            raise ValueError(
                f"The loss's aux entry {name!r} has shape {value.shape[1:]} per example; "
                "aux entries must be scalars (or the `context`)."
            )
        metrics[name] = jnp.mean(value.astype(jnp.float32))
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    if "context" in aux:
        metrics.update(context_statistics(aux["context"], axis_name=axis_name))
    return metrics


def make_train_step(
    loss_fn: LossFn,
    config: OptimConfig,
    *,
    total_steps: int,
    mesh: Mesh | None = None,
) -> StepFn:
    """The jitted training step for ``loss_fn`` under ``config``.

    **Arguments:**
    - `loss_fn`: the per-set loss, `(model, set, key) -> (loss, aux)`.
    - `config`: optimiser, EMA, precision and non-finite policy.
    - `total_steps`: the run's length, for the learning-rate schedule.
    - `mesh`: a `make_mesh()` mesh for data parallelism; the batch must then be placed with
      `shard_batch` and the state with `replicate`.

    **Returns:** `step(state, batch) -> (state, metrics)`; `batch` has the sets on axis 0.
    Metrics: `loss` and the aux means, `lr`, `debug/grad_norm[_<subtree>]`,
    `debug/param_norm[_<subtree>]`, `debug/update_norm`, the context statistics, and
    `debug/nonfinite` (1 when the update was skipped for a non-finite loss or gradient).
    """
    compute_dtype = COMPUTE_DTYPES[config.precision]
    schedule = learning_rate_schedule(config, total_steps)
    axis_name = DATA_AXIS if mesh is not None else None

    def gradients(
        params: PyTree, static: PyTree, batch: PyTree, keys: Array
    ) -> tuple[PyTree, dict[str, Array]]:
        def batch_loss(params: PyTree) -> tuple[Array, dict[str, Array]]:
            model = cast_floating(eqx.combine(params, static), compute_dtype)
            losses, aux = jax.vmap(loss_fn, in_axes=(None, 0, 0))(model, batch, keys)
            return jnp.mean(losses.astype(jnp.float32)), aux

        if axis_name is not None:
            # Mark the replicated parameters as varying per device, so that each device's
            # gradient is its own and the pmean below is the only reduction.
            params = jax.tree_util.tree_map(
                lambda x: jax.lax.pcast(x, axis_name, to="varying"), params
            )
        (loss, aux), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(params)
        metrics = _reduce_metrics(loss, aux, axis_name)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        return grads, metrics

    @eqx.filter_jit(donate="all")
    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, Array]]:
        optimizer = make_optimizer(config, state.model, total_steps)
        params, static = eqx.partition(state.model, trainable_filter(state.model, config.frozen))
        key, step_key = jax.random.split(state.key)
        keys = jax.random.split(step_key, jax.tree_util.tree_leaves(batch)[0].shape[0])
        if mesh is None:
            grads, metrics = gradients(params, static, batch, keys)
        else:
            sharded = jax.shard_map(
                lambda p, b, k: gradients(p, static, b, k),
                mesh=mesh,
                in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                out_specs=(P(), P()),
            )
            grads, metrics = sharded(params, batch, keys)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
            lr = jnp.asarray(schedule(state.step), jnp.float32)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        model = eqx.combine(optax.apply_updates(params, updates), static)
        candidate = TrainState(
            model=model,
            ema=ema_update(state.ema, model, state.step + 1, config),
            opt_state=opt_state,
            step=state.step + 1,
            key=key,
        )
        skipped = TrainState(state.model, state.ema, state.opt_state, state.step + 1, key)
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old) if eqx.is_array(new) else new,
            candidate,
            skipped,
        )
        metrics = {
            **metrics,
            "lr": lr,
            **subtree_norms(grads, "debug/grad_norm"),
            **subtree_norms(params, "debug/param_norm"),
            "debug/update_norm": global_norm(updates),
            "debug/nonfinite": (~finite).astype(jnp.float32),
        }
        return new_state, metrics

    return step
