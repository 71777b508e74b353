"""Value lists, constrained numbers and named sizes shared across the package.

A ``Literal`` alias is the one list of a setting's allowed values: pyright checks it statically,
the CLI offers it as choices and the configs' validator (``fsdm_eqx.config.check_value``) reads it
with ``typing.get_args``. The ``Annotated`` aliases attach ``annotated_types`` bounds to a number,
which the same validator checks at run time.
"""

from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval, MinLen

# Settings of the diffusion process and its training.
ScheduleName = Literal["linear", "cosine"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["mse", "hybrid"]
SamplerName = Literal["ddpm", "ddim", "ode"]
LRScheduleName = Literal["constant", "cosine", "step", "plateau"]
PrecisionName = Literal["float32", "bfloat16"]

# Data.
DatasetName = Literal["cifar100", "omniglot", "mnist"]
ClassSplitName = Literal["fc100", "random", "background_evaluation"]
SplitPart = Literal["train", "val", "test"]
OmniglotSubsetName = Literal["background", "evaluation", "background_small1", "background_small2"]

# Networks.
EncoderName = Literal["vit", "svit", "unet"]
PoolingName = Literal["cls", "mean", "sum", "mean_patch", "agg", "none"]
TOKEN_POOLINGS: tuple[PoolingName, ...] = ("mean_patch", "agg", "none")
"""The poolings that give the context as tokens (for LAG's cross-attention), not one vector."""
ConditioningName = Literal["film", "lag"]
DenoiserName = Literal["dit", "unet"]
DiTSize = Literal["S", "B"]

# Logging.
WandbMode = Literal["auto", "online", "offline", "disabled"]

# Numbers with bounds.
PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0.0)]
NonNegativeFloat = Annotated[float, Ge(0.0)]
UnitFloat = Annotated[float, Interval(ge=0.0, le=1.0)]
"""A number in [0, 1], e.g. DDIM's eta or an EMA decay."""
UnitFloatBelowOne = Annotated[float, Interval(ge=0.0, lt=1.0)]
"""A number in [0, 1), e.g. a dropout rate or Adam's beta."""
NonEmpty = MinLen(1)
"""Marker for a string or tuple that must hold at least one item: ``Annotated[str, NonEmpty]``."""

# Named sizes.
DIT_SIZES: dict[DiTSize, tuple[int, int, int]] = {"S": (384, 12, 6), "B": (768, 12, 12)}
"""The DiT's (hidden width, depth, heads) per named size (Peebles & Xie)."""
DATASET_IMAGE_SIZES: dict[DatasetName, tuple[int, ...]] = {
    "cifar100": (32,),
    "omniglot": (28, 32),
    "mnist": (28,),
}
"""Image sides each dataset is served at."""
GROUP_NORM_GROUPS = 32
"""Groups of the UNet's GroupNorm layers: every UNet width is a multiple of it."""
