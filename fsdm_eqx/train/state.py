"""The training state: one PyTree with everything a step changes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ..config import OptimConfig
from .optimizer import make_optimizer, trainable_filter


class TrainState(eqx.Module):
    """Model, its EMA, the optimiser state, the number of steps taken and the PRNG key."""

    model: PyTree
    ema: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray


def init_train_state(
    model: PyTree, config: OptimConfig, *, key: PRNGKeyArray, total_steps: int
) -> TrainState:
    """A fresh state: the EMA starts as a copy of the model (its own buffers, so that the step can
    donate both), and the optimiser sees only trainable leaves.

    **Arguments:**
    - `model`: the model PyTree (e.g. an `FSDM`).
    - `config`: the optimiser configuration; `config.frozen` subtrees get no optimiser state.
    - `key`: the root key of all training randomness.
    - `total_steps`: the run's length: the horizon of a cosine learning-rate schedule, recorded
      in the optimiser state (a `ScheduleState`), so that a resumed run keeps it.
    """
    optimizer = make_optimizer(config, model, total_steps)
    params = eqx.filter(model, trainable_filter(model, config.frozen))
    return TrainState(
        model=model,
        ema=jax.tree_util.tree_map(lambda x: x.copy() if eqx.is_array(x) else x, model),
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )
