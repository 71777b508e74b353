"""One training step, a pure function ``(state, batch) -> (state, metrics)``.

The per-set loss is vmapped over the batch; with a mesh, the gradient and the metrics are
computed per device inside ``shard_map`` and averaged with ``pmean`` over ``data``. The optimiser
update, the EMA and the guard against non-finite values follow on the replicated parameters.

The loss follows the `LossFn` protocol. When it reports the contexts it conditions on
(``aux["context"]``), the step passes it a zero ``context_offset`` to add to them and
differentiates with respect to the parameters and the offsets together, so the gradient with
respect to the contexts comes from the same backward pass.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ..config import OptimConfig
from ..instrument.norms import context_statistics, global_norm, subtree_norms
from ..nn.dit import DiT
from .optimizer import (
    applied_learning_rate,
    ema_decay_at,
    ema_update,
    make_optimizer,
    trainable_filter,
)
from .parallel import DATA_AXIS
from .state import TrainState


@runtime_checkable
class LossFn(Protocol):
    """The per-set loss the training step takes.

    ``loss_fn(model, set, key, *, context_offset=None) -> (loss, aux)`` for one example (one
    set); the step vmaps it over the batch. ``aux`` holds scalars to average over the batch, and
    optionally ``context`` (any shape ending in the context width), whose statistics are
    reported. When the loss reports ``context``, the step calls it with ``context_offset``, an
    array of the context's shape and dtype that the loss adds to the context before using it:
    the step passes zeros and differentiates with respect to them, which gives dL/dc in the same
    backward pass. A loss that reports no context is called without it.
    """

    def __call__(
        self,
        model: PyTree,
        example: PyTree,
        key: PRNGKeyArray,
        /,
        *,
        context_offset: Array | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """**Arguments:** the model (in the compute dtype), one example, its key, and the offset
        to add to the context the loss reports.

        **Returns:** the example's loss and its `aux` dictionary.
        """
        ...


StepFn = Callable[[TrainState, PyTree], tuple[TrainState, dict[str, Array]]]

COMPUTE_DTYPES = {"float32": jnp.dtype(jnp.float32), "bfloat16": jnp.dtype(jnp.bfloat16)}


def cast_floating(tree: PyTree, dtype: DTypeLike) -> PyTree:
    """``tree`` with its floating-point arrays cast to ``dtype`` (the compute copy of a model)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _call_with_offset(
    loss_fn: LossFn, model: PyTree, example: PyTree, key: PRNGKeyArray, offset: Array
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """``loss_fn(model, example, key, context_offset=offset)``, with one clear error for a loss
    that reports a context but does not take the offset."""
    try:
        return loss_fn(model, example, key, context_offset=offset)
    except TypeError as error:
        if "context_offset" not in str(error):
            raise
        raise TypeError(
            f"The loss {getattr(loss_fn, '__name__', loss_fn)!r} reports aux['context'] but "
            "takes no `context_offset` keyword; add `context_offset=None` to its signature "
            "and add it to the context (the step differentiates with respect to it)."
        ) from error


def grad_param_ratios(grads: PyTree, params: PyTree) -> dict[str, Float[Array, ""]]:
    """``debug/grad_param_ratio[_<subtree>]``: gradient norm over parameter norm, per top-level
    subtree and overall (0 where the parameters' norm is 0).

    **Arguments:**
    - `grads`, `params`: two PyTrees of the same structure.

    **Returns:** the ratios, in float32.
    """
    grad_norms = subtree_norms(grads, "g")
    param_norms = subtree_norms(params, "g")
    ratios: dict[str, Float[Array, ""]] = {}
    for name, g in grad_norms.items():
        p = param_norms.get(name, jnp.zeros((), jnp.float32))
        ratio = jnp.where(p > 0, g / jnp.where(p > 0, p, 1.0), 0.0)
        ratios["debug/grad_param_ratio" + name[1:]] = ratio
    return ratios


def subtree_aliases(model: PyTree) -> dict[str, str]:
    """Second names of top-level subtrees, as the W&B metrics spec names them: a DiT
    ``denoiser`` is also ``dit`` (`debug/grad_norm_dit`, `debug/param_norm_dit`).

    **Arguments:**
    - `model`: the model (an `FSDM`, or any PyTree).

    **Returns:** ``{field: alias}``, empty when the model has no DiT denoiser.
    """
    return {"denoiser": "dit"} if isinstance(getattr(model, "denoiser", None), DiT) else {}


def _norms_with_aliases(
    tree: PyTree, prefix: str, aliases: dict[str, str]
) -> dict[str, Float[Array, ""]]:
    """`subtree_norms` of ``tree``, with ``{prefix}_<alias>`` repeating ``{prefix}_<field>`` for
    each ``field: alias`` of `aliases` whose subtree has a norm."""
    norms = subtree_norms(tree, prefix)
    for field, alias in aliases.items():
        if f"{prefix}_{field}" in norms:
            norms[f"{prefix}_{alias}"] = norms[f"{prefix}_{field}"]
    return norms


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


class _Update(NamedTuple):
    """What one step computes before it applies anything."""

    params: PyTree
    static: PyTree
    grads: PyTree
    updates: PyTree
    opt_state: Any
    metrics: dict[str, Array]
    lr: Array
    key: PRNGKeyArray


def _update_fn(
    loss_fn: LossFn, config: OptimConfig, mesh: Mesh | None
) -> Callable[[TrainState, PyTree], _Update]:
    """``(state, batch) -> _Update``: the gradients of the batch's mean loss, averaged over the
    mesh, and the optimiser's update from them, shared by the step and `make_update_probe`."""
    compute_dtype = COMPUTE_DTYPES[config.precision]
    axis_name = DATA_AXIS if mesh is not None else None

    def gradients(
        params: PyTree, static: PyTree, batch: PyTree, keys: Array
    ) -> tuple[PyTree, dict[str, Array]]:
        def per_set_losses(params: PyTree, offsets: Array | None) -> tuple[Array, dict[str, Array]]:
            model = cast_floating(eqx.combine(params, static), compute_dtype)
            if offsets is None:
                return jax.vmap(loss_fn, in_axes=(None, 0, 0))(model, batch, keys)

            def one(example: PyTree, key: PRNGKeyArray, offset: Array) -> tuple[Array, Any]:
                return _call_with_offset(loss_fn, model, example, key, offset)

            return jax.vmap(one)(batch, keys, offsets)

        def batch_loss(
            diff: tuple[PyTree, Array | None],
        ) -> tuple[Array, dict[str, Array]]:
            losses, aux = per_set_losses(*diff)
            return jnp.mean(losses.astype(jnp.float32)), aux

        _, aux_shape = jax.eval_shape(per_set_losses, params, None)
        context = aux_shape.get("context")
        offsets = None if context is None else jnp.zeros(context.shape, context.dtype)
        if axis_name is not None:
            # Mark the replicated parameters as varying per device, so that each device's
            # gradient is its own and the pmean below is the only reduction.
            params, offsets = jax.tree_util.tree_map(
                lambda x: jax.lax.pcast(x, axis_name, to="varying"), (params, offsets)
            )
        (loss, aux), (grads, offset_grads) = eqx.filter_value_and_grad(batch_loss, has_aux=True)(
            (params, offsets)
        )
        metrics = _reduce_metrics(loss, aux, axis_name)
        if offset_grads is not None:
            # The gradient of the mean loss is 1 / batch of each set's own gradient.
            per_set = offset_grads.reshape(offset_grads.shape[0], -1).astype(jnp.float32)
            norms = jnp.linalg.norm(per_set * per_set.shape[0], axis=1)
            context_grad_norm = jnp.mean(norms)
            if axis_name is not None:
                context_grad_norm = jax.lax.pmean(context_grad_norm, axis_name)
            metrics["debug/context_grad_norm"] = context_grad_norm
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        return grads, metrics

    def update(state: TrainState, batch: PyTree) -> _Update:
        # Its update reads the count and the horizon from the state; total_steps sets them at init.
        optimizer = make_optimizer(config, state.model, total_steps=0)
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
            updates, opt_state = optimizer.update(
                grads, state.opt_state, params, value=metrics["loss"]
            )
            # The lr of this update, from optax's count of applied updates (skips excluded).
            lr = applied_learning_rate(config, state.opt_state, opt_state)
        return _Update(params, static, grads, updates, opt_state, metrics, lr, key)

    return update


def make_train_step(
    loss_fn: LossFn,
    config: OptimConfig,
    *,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> StepFn:
    """The jitted training step for ``loss_fn`` under ``config``.

    **Arguments:**
    - `loss_fn`: the per-set loss, `(model, set, key, *, context_offset=None) -> (loss, aux)`
      (the `LossFn` protocol; `fsdm_loss_fn` makes one for an `FSDM`).
    - `config`: optimiser, EMA, precision and non-finite policy.
    - `total_steps`: unused, accepted so that existing calls keep working: the schedule's
      horizon is part of the optimiser state (`init_train_state(total_steps=...)`), so that a
      resumed run keeps the learning rate it had.
    - `mesh`: a `make_mesh()` mesh for data parallelism; the batch must then be placed with
      `shard_batch` and the state with `replicate`.

    **Returns:** `step(state, batch) -> (state, metrics)`; `batch` has the sets on axis 0.
    Metrics: `loss` and the aux means (the loss's own diagnostics, such as the FSDM's
    `debug/modulation/<block>/<part>`), `lr` and `Optim/lr` (the base learning rate this
    update applies, from the optimiser state's count of applied updates),
    `debug/grad_norm[_<subtree>]`,
    `debug/param_norm[_<subtree>]` (for a DiT denoiser also `debug/grad_norm_dit` and
    `debug/param_norm_dit`, see `subtree_aliases`), `Optim/grad_global_norm` and
    `Optim/param_global_norm` (the L2 norms of the gradient, before clipping, and of the
    parameters over all trainable leaves, the same figures as `debug/grad_norm` and
    `debug/param_norm`), `debug/grad_param_ratio[_<subtree>]`, `debug/update_norm`
    and `Optim/update_global_norm` (the norm of the applied update, 0 on a skipped step),
    `Optim/ema_decay` (the decay the EMA applied at this step, 0 when it did not average),
    the context statistics
    (`debug/context_{norm,mean,max,std,vector_norm,signed_mean}`, see `context_statistics`) and
    `debug/context_grad_norm` (per set, the norm of the gradient of its loss with respect to
    its contexts, averaged over the batch) when the loss reports its context, and
    `debug/nonfinite` (1 when the update was skipped for a non-finite loss or gradient).
    Parameters, gradients, optimiser state and the loss's mean stay float32 under
    `precision="bfloat16"`; the network computes in bfloat16.
    """
    update = _update_fn(loss_fn, config, mesh)

    @eqx.filter_jit(donate="all")
    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, Array]]:
        params, static, grads, updates, opt_state, metrics, lr, key = update(state, batch)
        aliases = subtree_aliases(state.model)
        grad_norms = _norms_with_aliases(grads, "debug/grad_norm", aliases)
        param_norms = _norms_with_aliases(params, "debug/param_norm", aliases)
        grad_norm = grad_norms["debug/grad_norm"]
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        model = eqx.combine(optax.apply_updates(params, updates), static)
        decay, averaged = ema_decay_at(state.step + 1, config)
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
        update_norm = jnp.where(finite, global_norm(updates), 0.0)  # a skipped step applies none
        metrics = {
            **metrics,
            "lr": lr,
            "Optim/lr": lr,
            "Optim/update_global_norm": update_norm,
            "Optim/ema_decay": jnp.where(averaged & finite, decay, 0.0),
            "Optim/grad_global_norm": grad_norm,
            "Optim/param_global_norm": param_norms["debug/param_norm"],
            **grad_norms,
            **param_norms,
            **grad_param_ratios(grads, params),
            "debug/update_norm": update_norm,
            "debug/nonfinite": (~finite).astype(jnp.float32),
        }
        return new_state, metrics

    return step


def make_update_probe(
    loss_fn: LossFn, config: OptimConfig, *, mesh: Mesh | None = None
) -> Callable[[TrainState, PyTree], tuple[PyTree, PyTree]]:
    """``(state, batch) -> (grads, updates)``: the gradients and the optimiser update the
    training step would compute on ``batch``, without applying them (the state is unchanged),
    for the histograms of an evaluation."""
    update = _update_fn(loss_fn, config, mesh)

    @eqx.filter_jit
    def probe(state: TrainState, batch: PyTree) -> tuple[PyTree, PyTree]:
        u = update(state, batch)
        return u.grads, u.updates

    return probe
