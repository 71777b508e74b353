"""The training objective of an `FSDM`, in the form the training step takes."""

from __future__ import annotations

from jaxtyping import Array, Float, PRNGKeyArray

from ..config import DiffusionConfig
from ..diffusion import make_schedule
from ..nn import FSDM
from .step import LossFn


def fsdm_loss_fn(diffusion_config: DiffusionConfig) -> LossFn:
    """``(model, set, key) -> (loss, aux)`` from `FSDM.loss` on the training schedule.

    ``aux`` carries the scalar terms (`mse`, `vb`, `klc`) and the leave-one-out contexts, whose
    statistics the step reports.
    """
    schedule = make_schedule(diffusion_config.schedule, diffusion_config.num_steps)

    def loss_fn(
        model: FSDM, x_set: Float[Array, "ns c h w"], key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        terms = model.loss(x_set, key=key, diffusion_config=diffusion_config, schedule=schedule)
        aux = {name: value for name, value in terms.items() if name != "loss" and value.ndim == 0}
        aux["context"] = terms["context"]
        return terms["loss"], aux

    return loss_fn
