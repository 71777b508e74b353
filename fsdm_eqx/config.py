"""Frozen configuration dataclasses, validated on construction.

Each field declares its constraint once, in its annotation: a ``Literal`` lists the allowed values,
``Annotated`` attaches ``annotated_types`` bounds (the aliases of ``fsdm_eqx._custom_types``).
``check_fields``, run by every config's ``__post_init__``, reads the annotations and raises one
``ValueError`` that names the field, the value given and what is allowed; rules that tie several
fields together follow it as explicit code. The experiment CLI is generated from these dataclasses,
so they are the single list of settings. The classes are marked ``no_type_check`` so that run-time
type checkers leave the validation, and its message, to ``__post_init__``.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from types import NoneType, UnionType
from typing import (
    Annotated,
    Literal,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

import annotated_types as at
import tyro

from ._custom_types import (
    DATASET_IMAGE_SIZES,
    DIT_SIZES,
    GROUP_NORM_GROUPS,
    TOKEN_POOLINGS,
    ClassSplitName as ClassSplitName,
    ConditioningName as ConditioningName,
    DatasetName as DatasetName,
    DenoiserName as DenoiserName,
    DiTSize as DiTSize,
    EncoderName as EncoderName,
    LossType as LossType,
    LRScheduleName as LRScheduleName,
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    OmniglotSubsetName as OmniglotSubsetName,
    PoolingName as PoolingName,
    PositiveFloat,
    PositiveInt,
    PrecisionName as PrecisionName,
    SamplerName as SamplerName,
    ScheduleName as ScheduleName,
    SplitPart as SplitPart,
    UnitFloat,
    UnitFloatBelowOne,
    VarianceType as VarianceType,
    WandbMode as WandbMode,
)

_Config = TypeVar("_Config")


def no_type_check(cls: type[_Config]) -> type[_Config]:
    """Leave a config's validation, and its message, to ``__post_init__``.

    jaxtyping's import hook skips any class whose decorator is named ``no_type_check``; unlike
    ``typing.no_type_check`` this leaves the annotations visible (the CLI is built from them).
    """
    return cls


_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "it must be True or False"),
    int: ((int,), "it must be an integer"),
    float: ((int, float), "it must be a number"),
    str: ((str,), "it must be a string"),
    tuple: ((tuple,), "it must be a tuple"),
}
"""Run-time types of the annotations the validator checks, and what it says when they differ."""


def _listing(values: Iterable[object]) -> str:
    return ", ".join(repr(v) for v in values)


def _problem(value: object, hint: object) -> tuple[str, str] | None:
    """What is wrong with ``value`` under the annotation ``hint``, or None when nothing is.

    The answer is (what follows the field's name, what is allowed): ``("=0 is not allowed",
    "it must lie in [1, inf]")``, ``(" holds 'x', which is not allowed", "choose one of ...")``.
    """
    metadata: list[object] = []
    if get_origin(hint) is Annotated:
        hint, *metadata = get_args(hint)
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if all(get_origin(o) is Literal or o is NoneType for o in options):
        allowed = [v for o in options for v in (get_args(o) if o is not NoneType else (None,))]
        if any(type(v) is type(value) and v == value for v in allowed):
            return None
        return f"={value!r} is not allowed", f"choose one of {_listing(allowed)}"
    if NoneType in options:
        if value is None:
            return None
        (inner,) = (o for o in options if o is not NoneType)
        problem = _problem(value, Annotated[(inner, *metadata)] if metadata else inner)
        return problem and (problem[0], f"{problem[1]}, or be None")
    base = get_origin(hint) or hint
    if base in _TYPES:
        types, requirement = _TYPES[base]
        if not isinstance(value, types) or (base is not bool and isinstance(value, bool)):
            return f"={value!r} is not allowed", requirement
    if base is tuple and isinstance(value, tuple):
        items = get_args(hint)
        hints = [items[0]] * len(value) if items[1:] == (...,) else items
        for item, item_hint in zip(value, hints, strict=False):
            problem = _problem(item, item_hint)
            if problem:
                return f" holds {item!r}, which is not allowed", problem[1]
    return _metadata_problem(value, metadata)


def _metadata_problem(value: object, metadata: Iterable[object]) -> tuple[str, str] | None:
    """What breaks the ``annotated_types`` bounds and lengths in ``metadata``, or None."""
    low: float | None = None
    high: float | None = None
    low_open = high_open = False
    for group in metadata:
        for m in group if isinstance(group, at.GroupedMetadata) else [group]:
            if isinstance(m, at.Ge | at.Gt):
                low = cast(float, m.ge if isinstance(m, at.Ge) else m.gt)
                low_open = isinstance(m, at.Gt)
            elif isinstance(m, at.Le | at.Lt):
                high = cast(float, m.le if isinstance(m, at.Le) else m.lt)
                high_open = isinstance(m, at.Lt)
            elif isinstance(m, at.MinLen):
                if isinstance(value, str | tuple) and len(value) < m.min_length:
                    unit = "character" if isinstance(value, str) else "item"
                    what = " is empty" if value == () else f"={value!r} is not allowed"
                    plural = "s" if m.min_length > 1 else ""
                    return what, f"it must hold at least {m.min_length} {unit}{plural}"
            elif isinstance(m, at.BaseMetadata):
                raise TypeError(f"the config validator does not know the constraint {m!r}.")
    if not isinstance(value, int | float) or (low is None and high is None):
        return None
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    interval = (
        f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
        f"{'inf' if high is None else high}{')' if high_open else ']'}"
    )
    return f"={value!r} is not allowed", f"it must lie in {interval}"


def check_value(name: str, value: object, hint: object) -> None:
    """Raise one ``ValueError`` naming ``name`` unless ``value`` satisfies the annotation ``hint``.

    Understood: ``Literal`` (its values), ``bool``, ``int``, ``float``, ``str``, ``tuple[X, ...]``
    (each item), unions with ``None``, and ``Annotated`` with the ``annotated_types`` bounds
    (``Ge``, ``Gt``, ``Le``, ``Lt``, ``Interval``) and ``MinLen``. Any other annotation (an
    array, a module) is left to the type checker.
    """
    problem = _problem(value, hint)
    if problem is not None:
        raise ValueError(f"{name}{problem[0]}; {problem[1]}.")


@functools.cache
def _field_hints(cls: type) -> dict[str, object]:
    hints = get_type_hints(cls, include_extras=True)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def check_fields(obj: object) -> None:
    """Check every field of the dataclass ``obj`` against its annotation (see `check_value`)."""
    cls = type(obj)
    for name, hint in _field_hints(cls).items():
        check_value(f"{cls.__name__}.{name}", getattr(obj, name), hint)


@functools.cache
def _argument_hints(function: Callable[..., object]) -> dict[str, object]:
    return get_type_hints(function, include_extras=True)


def check_arguments(function: Callable[..., object], arguments: Mapping[str, object]) -> None:
    """Check the ``arguments`` of a call of ``function`` against its annotated parameters.

    Called first thing in an ``__init__`` as ``check_arguments(Cls.__init__, locals())``, so that
    a module built without a config gets the same one-sentence errors as a config.
    """
    owner = function.__qualname__.rsplit(".", 1)[0]
    for name, hint in _argument_hints(function).items():
        if name in arguments and name != "return":
            check_value(f"{owner}.{name}", arguments[name], hint)


def check_range(
    owner: object,
    field: str,
    *,
    low: int | float | None = None,
    high: int | float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise a ``ValueError`` unless ``owner.field`` is a number within the given bounds.

    For bounds that depend on other fields; a fixed bound belongs in the field's annotation.
    """
    bounds: list[object] = []
    if low is not None:
        bounds.append(at.Ge(low) if low_inclusive else at.Gt(low))
    if high is not None:
        bounds.append(at.Le(high) if high_inclusive else at.Lt(high))
    hint = Annotated[(float, *bounds)] if bounds else float
    check_value(f"{type(owner).__name__}.{field}", getattr(owner, field), hint)


@no_type_check
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The Gaussian diffusion: noise schedule, what the model predicts, the loss and the sampler.

    The denoiser always predicts the noise epsilon. With ``variance="learned_range"`` it also
    outputs, in as many extra channels, the interpolation between the posterior variance and beta
    (improved DDPM), trained by the hybrid loss ``L_simple + vlb_weight * L_vlb``.
    """

    num_steps: Annotated[int, at.Ge(2)] = 1000
    """Diffusion steps T used in training."""
    schedule: ScheduleName = "linear"
    """Beta schedule: `linear` (Ho et al., scaled by 1000/T) or `cosine` (Nichol & Dhariwal)."""
    variance: VarianceType = "learned_range"
    """Reverse-process variance: fixed to the posterior variance (`fixed_small`), to beta
    (`fixed_large`), or learned as an interpolation between them (`learned_range`)."""
    loss: LossType = "hybrid"
    """`mse`: epsilon MSE only; `hybrid`: MSE + vlb_weight * L_vlb (needs a learned variance)."""
    vlb_weight: NonNegativeFloat = 0.001
    """lambda of the hybrid loss, weighting L_vlb = T * E_t[L_t]; 0.001 as in improved DDPM."""
    sampling_steps: PositiveInt = 250
    """Steps used to sample, respaced evenly over the T training steps (improved DDPM)."""
    sampler: SamplerName = "ddpm"
    """`ddpm` ancestral sampling, `ddim` with `ddim_eta`, or the probability-flow `ode`."""
    ddim_eta: UnitFloat = 0.0
    """DDIM stochasticity: 0 is deterministic, 1 matches DDPM's marginals."""
    ode_rtol: PositiveFloat = 1e-4
    """Relative tolerance of the adaptive probability-flow ODE solver."""
    ode_atol: PositiveFloat = 1e-4
    """Absolute tolerance of the adaptive probability-flow ODE solver."""
    ode_max_steps: PositiveInt = 4096
    """Most steps the ODE solver may take; a solve that needs more stops with an error."""
    clip_denoised: bool = True
    """Clip the predicted x_0 to [-1, 1] at every DDPM/DDIM step; the ODE sampler clips only its
    final sample, so that it integrates the probability-flow ODE itself."""
    guidance_scale: NonNegativeFloat = 1.0
    """Classifier-free guidance on the context: the sampler's noise prediction is
    ``eps_null + w (eps_c - eps_null)``; 1 is plain conditional sampling, 0 the null-context model,
    above 1 a stronger pull towards the support's class (needs `ModelConfig.null_context_prob > 0`
    in training)."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range(self, "sampling_steps", low=1, high=self.num_steps)
        if self.loss == "hybrid" and self.variance != "learned_range":
            raise ValueError(
                f"DiffusionConfig.loss='hybrid' is not allowed with variance={self.variance!r}; "
                "the hybrid loss trains a learned variance: use variance='learned_range' or "
                "loss='mse'."
            )
        if self.loss == "mse" and self.variance == "learned_range":
            raise ValueError(
                "DiffusionConfig.variance='learned_range' is not allowed with loss='mse'; only "
                "the hybrid loss trains the variance: use loss='hybrid' or a fixed variance."
            )

    @property
    def learned_variance(self) -> bool:
        """Whether the denoiser outputs variance channels besides epsilon."""
        return self.variance == "learned_range"


@no_type_check
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up, clipping, per-subtree learning rates, frozen subtrees and an EMA.

    Subtrees are the model's top-level fields (for `FSDM`: encoder, posterior, denoiser).
    """

    lr: PositiveFloat = 1e-4
    """Peak learning rate."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW's decoupled weight decay."""
    b1: UnitFloatBelowOne = 0.9
    """Adam's first-moment decay."""
    b2: UnitFloatBelowOne = 0.999
    """Adam's second-moment decay."""
    eps: NonNegativeFloat = 1e-8
    """Adam's denominator offset."""
    grad_clip: NonNegativeFloat = 0.0
    """Clip gradients to this global norm; 0 disables clipping."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up from 0 to `lr` over this many steps."""
    lr_schedule: LRScheduleName = "constant"
    """After warm-up: `constant`; `cosine` decay to 0 at the run's last step (the length the
    run started with: a resumed run keeps its schedule); `step` decay by `lr_decay_factor` every
    `lr_decay_every` steps; or `plateau`: reduce by `lr_decay_factor` when the training loss,
    averaged over `plateau_window` steps, has not improved for `plateau_patience` windows."""
    lr_decay_factor: Annotated[float, at.Interval(gt=0.0, le=1.0)] = 0.1
    """Factor of each reduction of the `step` and `plateau` schedules."""
    lr_decay_every: PositiveInt = 10_000
    """Steps between two reductions of the `step` schedule (counted after warm-up)."""
    plateau_window: PositiveInt = 200
    """Steps whose training loss is averaged for one comparison of the `plateau` schedule."""
    plateau_patience: PositiveInt = 5
    """Windows without a relative improvement of 1e-4 before the `plateau` schedule reduces."""
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    """Per-subtree learning-rate factors, e.g. (("encoder", 2.0),)."""
    frozen: tuple[str, ...] = ()
    """Subtrees that are not trained, e.g. ("encoder",)."""
    ema_decay: UnitFloat = 0.995
    """Decay of the exponential moving average of the parameters."""
    ema_start: NonNegativeInt = 2000
    """Before this step the EMA copies the model."""
    ema_every: PositiveInt = 10
    """The EMA is updated every this many steps."""
    skip_nonfinite: bool = False
    """On a non-finite loss or gradient: skip the update (True) or stop the run (False)."""
    precision: PrecisionName = "float32"
    """Compute dtype of the network; parameters, optimiser state and losses stay float32."""

    def __post_init__(self) -> None:
        check_fields(self)
        names = [name for name, _ in self.lr_multipliers] + list(self.frozen)
        if len(set(names)) != len(names):
            raise ValueError(
                f"OptimConfig.lr_multipliers={self.lr_multipliers!r} and frozen={self.frozen!r} "
                "name a subtree twice; give each subtree at most one setting."
            )
        for name, factor in self.lr_multipliers:
            if not factor > 0:
                raise ValueError(
                    f"OptimConfig.lr_multipliers has {name!r}: {factor!r}; factors must be > 0 "
                    "(freeze a subtree with `frozen` instead)."
                )


@no_type_check
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset, its class-disjoint few-shot split and the set sampler that feeds training."""

    dataset: DatasetName = "cifar100"
    """`cifar100` (32x32 RGB), `omniglot` (background/evaluation characters) or `mnist`."""
    data_dir: Annotated[str | None, tyro.conf.arg(aliases=("--data-dir",))] = None
    """A local copy (archive, extracted folder or .npz); None downloads into `cache_dir`."""
    cache_dir: Annotated[str | None, tyro.conf.arg(aliases=("--cache-dir",))] = None
    """Download cache; None uses $FSDM_EQX_CACHE or ~/.cache/fsdm_eqx."""
    download: bool = True
    """Whether missing files may be downloaded."""
    omniglot_subsets: Annotated[tuple[OmniglotSubsetName, ...], NonEmpty] = (
        "background",
        "evaluation",
    )
    """Omniglot's zips ``images_<subset>.zip`` to read: the full `background` and `evaluation`
    sets, or the official small subsets `background_small1`/`2` (with `class_split='random'`)."""
    class_split: ClassSplitName = "fc100"
    """`fc100` (CIFAR-100 by superclass, 60/20/20), `random` (seeded, 60/20/20 of the classes),
    or `background_evaluation` (Omniglot's official split: background characters for training,
    less a seeded 10% of them held out for validation; evaluation characters for testing)."""
    split_seed: NonNegativeInt = 0
    """Seed of the `random` class split and of the `background_evaluation` validation hold-out."""
    split: SplitPart = "train"
    """Which classes the sampler draws from."""
    ns: PositiveInt = 6
    """Images per set: the reference trains on sets of 6, each image generated from the other 5."""
    batch_size: PositiveInt = 32
    """Sets per batch, over all hosts."""
    image_size: PositiveInt = 32
    """Side of the square images: 32 for CIFAR-100, 28 or 32 for Omniglot, 28 for MNIST."""
    flips: bool = False
    """Flip whole sets left-right and upside-down, each with probability 1/2 (training only)."""
    prefetch: NonNegativeInt = 2
    """Batches prepared ahead by the sampler's background threads (0: none)."""
    workers: PositiveInt = 1
    """Background threads preparing batches; raise it on a many-core host."""
    seed: NonNegativeInt = 0
    """Seed of the stream of batches."""

    def __post_init__(self) -> None:
        check_fields(self)
        sizes = DATASET_IMAGE_SIZES[self.dataset]
        if self.image_size not in sizes:
            raise ValueError(
                f"DataConfig.image_size={self.image_size!r} is not allowed; choose one of "
                f"{_listing(sizes)} for dataset={self.dataset!r}."
            )
        if self.class_split == "fc100" and self.dataset != "cifar100":
            raise ValueError(
                f"DataConfig.class_split='fc100' is not allowed with dataset={self.dataset!r}; "
                "FC100 splits CIFAR-100: use class_split='random'."
            )
        if self.class_split == "background_evaluation" and self.dataset != "omniglot":
            raise ValueError(
                "DataConfig.class_split='background_evaluation' is not allowed with "
                f"dataset={self.dataset!r}; it is Omniglot's split: use class_split='random'."
            )


@no_type_check
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The FSDM networks: set encoder, optional Gaussian posterior and denoiser (DiT or UNet).

    The encoder reads a set of images into a context (a vector pooled by `cls`, `mean` or `sum`
    for FiLM conditioning, or tokens by `mean_patch`, `agg` or `none` for LAG); the context
    conditions the denoiser. Presets: `model_preset(name)`.
    """

    encoder: EncoderName = "vit"
    """`vit`: the plain set ViT; `svit`: Shifted Patch Tokenization + Locality Self-Attention;
    `unet`: the UNet's downsampling half on each image, averaged over the set (its levels are the
    `unet_*` settings; `pooling='mean'`, FiLM, no timestep token)."""
    pooling: PoolingName = "mean"
    """How the ViT's tokens become the context: one vector by `cls`, `mean` or `sum` (FiLM), or
    tokens (LAG) by `mean_patch` (per patch position, the mean over the set), `agg` (the set's
    mean patch embeddings through the transformer, every output token) or `none` (every output
    token of every image: their number grows with the set)."""
    conditioning: ConditioningName = "film"
    """`film`: the context vector modulates the denoiser; `lag`: its tokens are attended to."""
    hdim: PositiveInt = 256
    """Width of the encoder and size of the context (per token for LAG)."""
    encoder_depth: PositiveInt = 6
    """Transformer blocks of the encoder."""
    encoder_heads: PositiveInt = 12
    """Attention heads of the encoder."""
    encoder_head_dim: PositiveInt = 64
    """Width of each encoder attention head (the UNet encoder's too)."""
    encoder_mlp_dim: PositiveInt = 256
    """Hidden width of the encoder's MLPs."""
    encoder_dropout: UnitFloatBelowOne = 0.0
    """Dropout in the encoder (embeddings, attention outputs, MLPs)."""
    encoder_patch_size: PositiveInt = 8
    """Side of the encoder's square patches; divides `image_size`."""
    encoder_time_token: bool = False
    """Feed the diffusion timestep to the encoder as a token, in training and sampling alike (the
    context is then recomputed at every sampling step)."""
    variational: bool = True
    """Sample the context from a Gaussian posterior with a KL to N(0, I) (VFSDDPM); at sampling
    time its mean is used."""
    denoiser: DenoiserName = "dit"
    """The denoiser: `dit` or the paper's `unet`."""
    dit_size: DiTSize | None = "S"
    """Named DiT size (`S`: 384 wide, 12 deep, 6 heads; `B`: 768, 12, 12), or None to give
    `dit_hidden`, `dit_depth` and `dit_heads` explicitly."""
    dit_hidden: PositiveInt | None = None
    """DiT width, overriding the named size."""
    dit_depth: PositiveInt | None = None
    """DiT depth, overriding the named size."""
    dit_heads: PositiveInt | None = None
    """DiT heads, overriding the named size."""
    dit_patch_size: PositiveInt = 2
    """Side of the DiT's square patches; divides `image_size`."""
    dit_gate_bias: float = 0.0
    """Initial bias of the DiT blocks' adaLN gates: 0 is adaLN-Zero, positive warm-starts."""
    image_size: PositiveInt = 32
    """Side of the square images."""
    channels: PositiveInt = 3
    """Image channels."""
    ns: Annotated[int, at.Ge(2)] = 6
    """Images per set in training (each is generated from the other ns - 1); `FSDM.loss` checks
    the sets it is given against it."""
    learned_variance: bool = True
    """The denoiser also outputs the variance interpolation (2 * channels outputs); must agree
    with `DiffusionConfig.variance`."""
    unet_model_channels: PositiveInt = 64
    """UNet channels of the first level (a multiple of 32)."""
    unet_channel_mult: Annotated[tuple[PositiveInt, ...], NonEmpty] = (1, 2, 3, 4)
    """UNet channel multiplier per level."""
    unet_num_res_blocks: PositiveInt = 2
    """UNet residual blocks per level."""
    unet_attention_resolutions: tuple[PositiveInt, ...] = (16, 8)
    """Feature-map sides at which the UNet attends."""
    unet_num_heads: PositiveInt = 4
    """UNet attention heads."""
    unet_dropout: UnitFloatBelowOne = 0.2
    """Dropout in the UNet's residual blocks."""
    null_context_prob: UnitFloatBelowOne = 0.1
    """Probability that a training image sees the learned null context instead of its set's:
    the null-context model it trains is what classifier-free guidance
    (`DiffusionConfig.guidance_scale`) steers away from. 0 trains no null context."""
    remat: bool = False
    """Recompute activations in the backward pass instead of storing them, per DiT block, UNet
    residual and attention block, and around each encoder call: less memory, more compute."""

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.conditioning == "lag") != (self.pooling in TOKEN_POOLINGS):
            raise ValueError(
                f"ModelConfig.conditioning={self.conditioning!r} is not allowed with "
                f"pooling={self.pooling!r}; LAG attends to context tokens: use conditioning='lag' "
                "with pooling 'mean_patch', 'agg' or 'none', and 'film' with 'cls', 'mean' or "
                "'sum'."
            )
        if self.encoder == "unet":
            if self.pooling != "mean":
                raise ValueError(
                    f"ModelConfig.encoder='unet' is not allowed with pooling={self.pooling!r}; "
                    "the UNet encoder averages its image vectors over the set: use "
                    "pooling='mean' (with FiLM)."
                )
            if self.encoder_time_token:
                raise ValueError(
                    "ModelConfig.encoder_time_token=True is not allowed with encoder='unet'; the "
                    "UNet encoder reads no timestep: set encoder_time_token=False."
                )
        elif self.image_size % self.encoder_patch_size:
            raise ValueError(
                f"ModelConfig.encoder_patch_size={self.encoder_patch_size} is not allowed; it "
                f"must divide image_size={self.image_size}."
            )
        if self.denoiser == "dit":
            if self.image_size % self.dit_patch_size:
                raise ValueError(
                    f"ModelConfig.dit_patch_size={self.dit_patch_size} is not allowed; it must "
                    f"divide image_size={self.image_size}."
                )
            if self.dit_size is None and None in (self.dit_hidden, self.dit_depth, self.dit_heads):
                raise ValueError(
                    "ModelConfig.dit_size=None is not allowed without dit_hidden, dit_depth and "
                    "dit_heads; name a size ('S', 'B') or give all three."
                )
            hidden, _, heads = self.dit_dims
            if hidden % heads or hidden % 4:
                raise ValueError(
                    f"ModelConfig DiT width {hidden} is not allowed with {heads} heads; it must "
                    "be a multiple of 4 and of the number of heads."
                )
        if "unet" in (self.denoiser, self.encoder) and self.unet_model_channels % GROUP_NORM_GROUPS:
            raise ValueError(
                f"ModelConfig.unet_model_channels={self.unet_model_channels} is not allowed; "
                f"it must be a multiple of {GROUP_NORM_GROUPS} (the GroupNorm groups)."
            )

    @property
    def dit_dims(self) -> tuple[int, int, int]:
        """The DiT's (hidden width, depth, heads): the named size with explicit overrides."""
        named = (0, 0, 0) if self.dit_size is None else DIT_SIZES[self.dit_size]
        return (
            self.dit_hidden or named[0],
            self.dit_depth or named[1],
            self.dit_heads or named[2],
        )

    @property
    def out_channels(self) -> int:
        """Channels the denoiser predicts: epsilon, plus as many variance channels if learned."""
        return 2 * self.channels if self.learned_variance else self.channels


MODEL_PRESETS: dict[str, ModelConfig] = {
    "paper-cifar100": ModelConfig(
        encoder="vit",
        pooling="mean",
        conditioning="film",
        hdim=256,
        encoder_depth=6,
        encoder_heads=12,
        encoder_head_dim=64,
        encoder_mlp_dim=256,
        encoder_dropout=0.2,
        encoder_patch_size=8,
        encoder_time_token=True,
        variational=False,
        denoiser="unet",
        image_size=32,
        channels=3,
        ns=6,
        learned_variance=True,
    ),
    "dit-s-cifar100": ModelConfig(
        encoder="vit",
        pooling="mean",
        conditioning="film",
        hdim=256,
        encoder_depth=6,
        encoder_heads=12,
        encoder_head_dim=64,
        encoder_mlp_dim=256,
        encoder_dropout=0.2,
        encoder_patch_size=8,
        encoder_time_token=True,
        variational=False,
        denoiser="dit",
        dit_size="S",
        dit_patch_size=2,
        image_size=32,
        channels=3,
        ns=6,
        learned_variance=True,
    ),
    "smoke": ModelConfig(
        hdim=32,
        encoder_depth=1,
        encoder_heads=2,
        encoder_head_dim=16,
        encoder_mlp_dim=64,
        encoder_patch_size=8,
        denoiser="dit",
        dit_size=None,
        dit_hidden=32,
        dit_depth=2,
        dit_heads=2,
        dit_patch_size=4,
        image_size=32,
        channels=3,
        ns=6,
    ),
}
MODEL_PRESETS["vfsddpm_cifar100_vit_film_mean_sigma"] = MODEL_PRESETS["paper-cifar100"]
MODEL_PRESETS["vfsddpm_cifar100_vit_lag_meanpatch_sigma"] = dataclasses.replace(
    MODEL_PRESETS["paper-cifar100"], conditioning="lag", pooling="mean_patch"
)
for _name, _changes in {
    "vfsddpm_cifar100_vit_lag_agg_sigma": {"conditioning": "lag", "pooling": "agg"},
    "vfsddpm_cifar100_vit_lag_none_sigma": {"conditioning": "lag", "pooling": "none"},
    "vfsddpm_cifar100_vitset_lag_none_sigma": {
        "encoder": "svit",
        "conditioning": "lag",
        "pooling": "none",
    },
    "vfsddpm_cifar100_unet_film_mean_sigma": {"encoder": "unet", "encoder_time_token": False},
    "vfsddpm_cifar100_unet_film_mean_vi": {
        "encoder": "unet",
        "encoder_time_token": False,
        "variational": True,
    },
}.items():
    MODEL_PRESETS[_name] = dataclasses.replace(MODEL_PRESETS["paper-cifar100"], **_changes)
"""Named model configurations: `paper-cifar100`, also named after the reference run it
reproduces, `vfsddpm_cifar100_vit_film_mean_sigma` (ViT encoder, mean pooling, FiLM,
deterministic context, UNet with learned variance: FID 45.50 on unseen classes in the paper);
`vfsddpm_cifar100_vit_lag_meanpatch_sigma` (the paper's best run: the same ViT, its patch tokens
averaged over the set and read by the UNet's cross-attention (LAG), deterministic: FID 35.07);
the reference's other CIFAR-100 runs, each the same but for the named part: LAG on the ViT's
tokens pooled by `agg` (`vfsddpm_cifar100_vit_lag_agg_sigma`) or `none`
(`vfsddpm_cifar100_vit_lag_none_sigma`, and with the sViT `vfsddpm_cifar100_vitset_lag_none_sigma`),
and the image-level UNet encoder with FiLM on the mean over the set, deterministic
(`vfsddpm_cifar100_unet_film_mean_sigma`) or variational (`vfsddpm_cifar100_unet_film_mean_vi`;
the paper reports FID 38.50 for its UNet-encoder model); `dit-s-cifar100` (the FiLM encoder with
DiT-S/2) and `smoke` (tiny networks on the same 32x32 sets of 6, compiles in seconds on a CPU)."""


def model_preset(name: str) -> ModelConfig:
    """The named `ModelConfig`; raises a `ValueError` listing the names for an unknown one."""
    if name not in MODEL_PRESETS:
        raise ValueError(
            f"model preset {name!r} is not known; choose one of "
            f"{', '.join(repr(n) for n in MODEL_PRESETS)}."
        )
    return MODEL_PRESETS[name]


@no_type_check
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Few-shot evaluation on held-out classes: FID, KID, precision/recall, likelihood, the probe.

    The defaults are the protocol of the FSDM paper's reference code on CIFAR-100: 2000 support
    sets of 5 images from the unseen classes, 5 images generated per set with 250 respaced DDPM
    steps, so 10,000 generated images against the 10,000 pooled real images of the sets.
    """

    num_sets: PositiveInt = 2000
    """Support sets drawn for the FID protocol (10,000 real images at ns = 5)."""
    ns: Annotated[int, at.Ge(2)] = 5
    """Real images per support set."""
    samples_per_set: PositiveInt = 5
    """Images generated from each support set (10,000 in all at the defaults)."""
    sampler: SamplerName = "ddpm"
    """Sampler used to generate: `ddpm` ancestral (the reference), `ddim` or `ode`."""
    sampling_steps: PositiveInt = 250
    """Respaced sampling steps (250 in the reference)."""
    seed: NonNegativeInt = 0
    """Seed of the support sets, the generation keys and the KID subsets."""
    generate_batch_size: PositiveInt = 32
    """Support sets per generation call (one compiled shape; the last batch is padded)."""
    feature_batch_size: PositiveInt = 250
    """Images per call of the feature extractor."""
    kid_subset_size: Annotated[int, at.Ge(2)] = 1000
    """Rows per KID subset (torch-fidelity's default)."""
    kid_num_subsets: PositiveInt = 100
    """Number of KID subsets."""
    pr_neighbours: PositiveInt = 3
    """k of the k-nearest-neighbour manifolds of precision/recall (Kynkaanniemi et al.)."""
    inception_weights: str | None = None
    """A local FID Inception weights file; None downloads (checksum-verified) and caches it."""
    eval_split: SplitPart = "test"
    """Classes of the few-shot figures: `test` or `val` (unseen, labelled "out-distro") or
    `train` (labelled "in-distro")."""
    likelihood_sets: PositiveInt = 2000
    """Sets whose images are scored in bits/dim, each under its leave-one-out context."""
    likelihood_steps: PositiveInt | None = None
    """Timesteps of the variational bound: None for all T, else a respaced subset."""
    likelihood_batch_size: PositiveInt = 16
    """Sets per likelihood call."""
    probe_episodes: PositiveInt = 10
    """Episodes of the classification probe (one support set per class per episode)."""
    probe_queries_per_class: PositiveInt = 15
    """Query images per class per episode, disjoint from that episode's support set."""
    curve_sets: PositiveInt = 200
    """Support sets of the cheap FID computed during training (`RunConfig.fid_every`), the same
    sets at every evaluation; the other counts are this protocol's."""
    curve_sampler: SamplerName = "ddim"
    """Sampler of that FID."""
    curve_sampling_steps: PositiveInt = 50
    """Respaced sampling steps of that FID."""

    def __post_init__(self) -> None:
        check_fields(self)


@no_type_check
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The training loop: run length, where checkpoints and metrics go, and how often."""

    run_dir: Annotated[str, NonEmpty] = "runs/default"
    """Directory of the run's checkpoints and metrics; a run restarted on it resumes."""
    num_steps: PositiveInt = 1000
    """Training steps of the whole run (a resumed run continues to this total)."""
    log_every: PositiveInt = 100
    """Metrics are pulled to the host and logged every this many steps."""
    eval_every: NonNegativeInt = 1000
    """`eval_fn` runs every this many steps; 0 never evaluates."""
    save_every: NonNegativeInt = 1000
    """A checkpoint is written every this many steps (and at the end); 0 saves at the end only."""
    keep_checkpoints: PositiveInt = 3
    """The last this many checkpoints are kept."""
    seed: NonNegativeInt = 0
    """Root seed of the run (model initialisation, training keys, the set sampler)."""
    fid_every: NonNegativeInt | None = None
    """A cheap few-shot FID/KID (`EvalConfig.curve_sets`, `curve_sampler`) is computed every
    this many steps, a multiple of `eval_every`: None with every evaluation, 0 never."""
    early_stopping_patience: NonNegativeInt = 0
    """Stop after this many evaluations without improvement of the monitored metric (`fid` when
    the run computes it during training, else `eval_loss`); 0 disables."""
    early_stopping_min_delta: NonNegativeFloat = 0.0
    """An evaluation improves only when the monitored metric falls by more than this."""
    keep_best: bool = True
    """Keep the checkpoint of the best monitored metric under `run_dir/best/`."""
    resume_anyway: bool = False
    """Resume `run_dir` even though its checkpoint was written for another model, diffusion or
    data configuration (a warning names the differences); without it such a resume is refused."""
    progress: bool = True
    """Show a progress bar with steps/s and the ETA."""
    sample_every: NonNegativeInt = 1000
    """`images_fn` runs and its images are logged every this many steps; 0 never."""
    wandb: WandbMode = "auto"
    """Weights & Biases: `auto` is online when credentials exist and offline otherwise;
    `disabled` creates no W&B run (metrics and images are still written under `run_dir`)."""
    wandb_project: Annotated[str, NonEmpty] = "fsdm_eqx"
    """W&B project of the run."""
    wandb_entity: Annotated[str, NonEmpty] | None = None
    """W&B entity (user or team); None uses the account's default."""
    wandb_init_timeout: PositiveFloat = 30.0
    """Seconds to wait for the W&B server before falling back to an offline run."""

    def __post_init__(self) -> None:
        check_fields(self)
