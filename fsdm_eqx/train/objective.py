"""The training objective of an `FSDM`, in the form the training step takes."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..config import DiffusionConfig
from ..diffusion import make_schedule
from ..nn import FSDM
from .step import LossFn


def fsdm_loss_fn(diffusion_config: DiffusionConfig) -> LossFn:
    """The `LossFn` of an `FSDM`, ``(model, set, key, *, context_offset=None) -> (loss, aux)``,
    from `FSDM.loss` on the training schedule.

    ``aux`` carries the scalar terms (`mse`, `vb`, `klc`), the leave-one-out contexts, whose
    statistics and gradient the step reports, and `debug/modulation/<block>/<part>`: the
    denoiser's `modulation` magnitudes at this set's timesteps and contexts, averaged over the
    set.
    """
    schedule = make_schedule(diffusion_config.schedule, diffusion_config.num_steps)

    def loss_fn(
        model: FSDM,
        x_set: Float[Array, "ns c h w"],
        key: PRNGKeyArray,
        *,
        context_offset: Float[Array, "ns ..."] | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        terms = model.loss(
            x_set,
            key=key,
            diffusion_config=diffusion_config,
            schedule=schedule,
            context_offset=context_offset,
        )
        aux = {name: value for name, value in terms.items() if name != "loss" and value.ndim == 0}
        aux["context"] = terms["context"]
        modulation = jax.vmap(model.denoiser.modulation)(terms["timesteps"], terms["context"])
        for name, values in modulation.items():
            aux[f"debug/modulation/{name}"] = jnp.mean(values)
        return terms["loss"], aux

    return loss_fn
