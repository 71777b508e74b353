"""Frozen configuration dataclasses, validated on construction.

Every config checks its own fields in ``__post_init__``: a bad value raises one ``ValueError`` that
names the field, the value given and what is allowed. The experiment CLI is generated from these
dataclasses, so they are the single list of settings. The classes are marked ``no_type_check`` so
that run-time type checkers leave the validation, and its message, to ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Annotated, Literal, TypeVar, cast, get_args

import tyro

ScheduleName = Literal["linear", "cosine"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["mse", "hybrid"]
SamplerName = Literal["ddpm", "ddim", "ode"]


_Config = TypeVar("_Config")


def no_type_check(cls: type[_Config]) -> type[_Config]:
    """Leave a config's validation, and its message, to ``__post_init__``.

    jaxtyping's import hook skips any class whose decorator is named ``no_type_check``; unlike
    ``typing.no_type_check`` this leaves the annotations visible (the CLI is built from them).
    """
    return cls


def check_choice(owner: object, field: str, allowed: Iterable[object]) -> None:
    """Raise a ``ValueError`` unless ``owner.field`` is one of ``allowed``."""
    value = getattr(owner, field)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{type(owner).__name__}.{field}={value!r} is not allowed; "
            f"choose one of {', '.join(repr(a) for a in allowed)}."
        )


def check_range(
    owner: object,
    field: str,
    *,
    low: int | float | None = None,
    high: int | float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise a ``ValueError`` unless ``owner.field`` is a number within the given bounds."""
    value = getattr(owner, field)
    name = f"{type(owner).__name__}.{field}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a number.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        brackets = ("[" if low_inclusive else "(", "]" if high_inclusive else ")")
        raise ValueError(
            f"{name}={value!r} is not allowed; it must lie in {brackets[0]}{lo}, {hi}{brackets[1]}."
        )


@no_type_check
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The Gaussian diffusion: noise schedule, what the model predicts, the loss and the sampler.

    The denoiser always predicts the noise epsilon. With ``variance="learned_range"`` it also
    outputs, in as many extra channels, the interpolation between the posterior variance and beta
    (improved DDPM), trained by the hybrid loss ``L_simple + vlb_weight * L_vlb``.
    """

    num_steps: int = 1000
    """Diffusion steps T used in training."""
    schedule: ScheduleName = "linear"
    """Beta schedule: `linear` (Ho et al., scaled by 1000/T) or `cosine` (Nichol & Dhariwal)."""
    variance: VarianceType = "learned_range"
    """Reverse-process variance: fixed to the posterior variance (`fixed_small`), to beta
    (`fixed_large`), or learned as an interpolation between them (`learned_range`)."""
    loss: LossType = "hybrid"
    """`mse`: epsilon MSE only; `hybrid`: MSE + vlb_weight * L_vlb (needs a learned variance)."""
    vlb_weight: float = 0.001
    """lambda of the hybrid loss, weighting L_vlb = T * E_t[L_t]; 0.001 as in improved DDPM."""
    sampling_steps: int = 250
    """Steps used to sample, respaced evenly over the T training steps (improved DDPM)."""
    sampler: SamplerName = "ddpm"
    """`ddpm` ancestral sampling, `ddim` with `ddim_eta`, or the probability-flow `ode`."""
    ddim_eta: float = 0.0
    """DDIM stochasticity: 0 is deterministic, 1 matches DDPM's marginals."""
    ode_rtol: float = 1e-4
    """Relative tolerance of the adaptive probability-flow ODE solver."""
    ode_atol: float = 1e-4
    """Absolute tolerance of the adaptive probability-flow ODE solver."""
    ode_max_steps: int = 4096
    """Most steps the ODE solver may take; a solve that needs more stops with an error."""
    clip_denoised: bool = True
    """Clip the predicted x_0 to [-1, 1] at every DDPM/DDIM step; the ODE sampler clips only its
    final sample, so that it integrates the probability-flow ODE itself."""
    guidance_scale: float = 1.0
    """Classifier-free guidance on the context: the sampler's noise prediction is
    ``eps_null + w (eps_c - eps_null)``; 1 is plain conditional sampling, 0 the null-context model,
    above 1 a stronger pull towards the support's class (needs `ModelConfig.null_context_prob > 0`
    in training)."""

    def __post_init__(self) -> None:
        check_range(self, "num_steps", low=2)
        check_choice(self, "schedule", get_args(ScheduleName))
        check_choice(self, "variance", get_args(VarianceType))
        check_choice(self, "loss", get_args(LossType))
        check_choice(self, "sampler", get_args(SamplerName))
        check_range(self, "vlb_weight", low=0.0)
        check_range(self, "sampling_steps", low=1, high=self.num_steps)
        check_range(self, "ddim_eta", low=0.0, high=1.0)
        check_range(self, "guidance_scale", low=0.0)
        check_range(self, "ode_rtol", low=0.0, low_inclusive=False)
        check_range(self, "ode_atol", low=0.0, low_inclusive=False)
        check_range(self, "ode_max_steps", low=1)
        for name in ("num_steps", "sampling_steps", "ode_max_steps"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(
                    f"DiffusionConfig.{name}={getattr(self, name)!r} is not allowed; "
                    "it must be an integer."
                )
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


LRScheduleName = Literal["constant", "cosine", "step", "plateau"]
PrecisionName = Literal["float32", "bfloat16"]


@no_type_check
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up, clipping, per-subtree learning rates, frozen subtrees and an EMA.

    Subtrees are the model's top-level fields (for `FSDM`: encoder, posterior, denoiser).
    """

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    b1: float = 0.9
    """Adam's first-moment decay."""
    b2: float = 0.999
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's denominator offset."""
    grad_clip: float = 0.0
    """Clip gradients to this global norm; 0 disables clipping."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps."""
    lr_schedule: LRScheduleName = "constant"
    """After warm-up: `constant`; `cosine` decay to 0 at the run's last step (the length the
    run started with: a resumed run keeps its schedule); `step` decay by `lr_decay_factor` every
    `lr_decay_every` steps; or `plateau`: reduce by `lr_decay_factor` when the training loss,
    averaged over `plateau_window` steps, has not improved for `plateau_patience` windows."""
    lr_decay_factor: float = 0.1
    """Factor of each reduction of the `step` and `plateau` schedules."""
    lr_decay_every: int = 10_000
    """Steps between two reductions of the `step` schedule (counted after warm-up)."""
    plateau_window: int = 200
    """Steps whose training loss is averaged for one comparison of the `plateau` schedule."""
    plateau_patience: int = 5
    """Windows without a relative improvement of 1e-4 before the `plateau` schedule reduces."""
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    """Per-subtree learning-rate factors, e.g. (("encoder", 2.0),)."""
    frozen: tuple[str, ...] = ()
    """Subtrees that are not trained, e.g. ("encoder",)."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the parameters."""
    ema_start: int = 2000
    """Before this step the EMA copies the model."""
    ema_every: int = 10
    """The EMA is updated every this many steps."""
    skip_nonfinite: bool = False
    """On a non-finite loss or gradient: skip the update (True) or stop the run (False)."""
    precision: PrecisionName = "float32"
    """Compute dtype of the network; parameters, optimiser state and losses stay float32."""

    def __post_init__(self) -> None:
        check_range(self, "lr", low=0.0, low_inclusive=False)
        check_range(self, "weight_decay", low=0.0)
        check_range(self, "b1", low=0.0, high=1.0, high_inclusive=False)
        check_range(self, "b2", low=0.0, high=1.0, high_inclusive=False)
        check_range(self, "eps", low=0.0)
        check_range(self, "grad_clip", low=0.0)
        check_range(self, "warmup_steps", low=0)
        check_choice(self, "lr_schedule", get_args(LRScheduleName))
        check_range(self, "lr_decay_factor", low=0.0, high=1.0, low_inclusive=False)
        for name in ("lr_decay_every", "plateau_window", "plateau_patience"):
            check_range(self, name, low=1)
        check_range(self, "ema_decay", low=0.0, high=1.0)
        check_range(self, "ema_start", low=0)
        check_range(self, "ema_every", low=1)
        check_choice(self, "precision", get_args(PrecisionName))
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


DatasetName = Literal["cifar100", "omniglot", "mnist"]
ClassSplitName = Literal["fc100", "random", "background_evaluation"]
SplitPart = Literal["train", "val", "test"]
OmniglotSubsetName = Literal["background", "evaluation", "background_small1", "background_small2"]


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
    omniglot_subsets: tuple[OmniglotSubsetName, ...] = ("background", "evaluation")
    """Omniglot's zips ``images_<subset>.zip`` to read: the full `background` and `evaluation`
    sets, or the official small subsets `background_small1`/`2` (with `class_split='random'`)."""
    class_split: ClassSplitName = "fc100"
    """`fc100` (CIFAR-100 by superclass, 60/20/20), `random` (seeded, 60/20/20 of the classes),
    or `background_evaluation` (Omniglot's official split: background characters for training,
    less a seeded 10% of them held out for validation; evaluation characters for testing)."""
    split_seed: int = 0
    """Seed of the `random` class split and of the `background_evaluation` validation hold-out."""
    split: SplitPart = "train"
    """Which classes the sampler draws from."""
    ns: int = 6
    """Images per set: the reference trains on sets of 6, each image generated from the other 5."""
    batch_size: int = 32
    """Sets per batch, over all hosts."""
    image_size: int = 32
    """Side of the square images: 32 for CIFAR-100, 28 or 32 for Omniglot, 28 for MNIST."""
    flips: bool = False
    """Flip whole sets left-right and upside-down, each with probability 1/2 (training only)."""
    prefetch: int = 2
    """Batches prepared ahead by the sampler's background threads (0: none)."""
    workers: int = 1
    """Background threads preparing batches; raise it on a many-core host."""
    seed: int = 0
    """Seed of the stream of batches."""

    def __post_init__(self) -> None:
        check_choice(self, "dataset", get_args(DatasetName))
        check_choice(self, "class_split", get_args(ClassSplitName))
        check_choice(self, "split", get_args(SplitPart))
        if not self.omniglot_subsets:
            raise ValueError("DataConfig.omniglot_subsets is empty; name at least one subset.")
        for subset in self.omniglot_subsets:
            if subset not in get_args(OmniglotSubsetName):
                raise ValueError(
                    f"DataConfig.omniglot_subsets holds {subset!r}, which is not allowed; choose "
                    f"from {', '.join(repr(a) for a in get_args(OmniglotSubsetName))}."
                )
        names = ("split_seed", "ns", "batch_size", "image_size", "prefetch", "workers", "seed")
        for name in names:
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(
                    f"DataConfig.{name}={getattr(self, name)!r} is not allowed; "
                    "it must be an integer."
                )
        check_range(self, "split_seed", low=0)
        check_range(self, "ns", low=1)
        check_range(self, "batch_size", low=1)
        check_range(self, "prefetch", low=0)
        check_range(self, "workers", low=1)
        check_range(self, "seed", low=0)
        sizes = {"cifar100": (32,), "omniglot": (28, 32), "mnist": (28,)}[self.dataset]
        check_choice(self, "image_size", sizes)
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


EncoderName = Literal["vit", "svit"]
PoolingName = Literal["cls", "mean", "sum", "mean_patch"]
ConditioningName = Literal["film", "lag"]
DenoiserName = Literal["dit", "unet"]
DiTSize = Literal["S", "B"]


@no_type_check
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The FSDM networks: set encoder, optional Gaussian posterior and denoiser (DiT or UNet).

    The encoder reads a set of images into a context (a vector pooled by `cls`, `mean` or `sum`
    for FiLM conditioning, or one token per patch position by `mean_patch` for LAG); the context
    conditions the denoiser. Presets: `model_preset(name)`.
    """

    encoder: EncoderName = "vit"
    """`vit`: the plain set ViT; `svit`: Shifted Patch Tokenization + Locality Self-Attention."""
    pooling: PoolingName = "mean"
    """How the encoder's tokens become the context: `cls`, `mean`, `sum` or `mean_patch` (LAG)."""
    conditioning: ConditioningName = "film"
    """`film`: the context vector modulates the denoiser; `lag`: its tokens are attended to."""
    hdim: int = 256
    """Width of the encoder and size of the context (per token for LAG)."""
    encoder_depth: int = 6
    """Transformer blocks of the encoder."""
    encoder_heads: int = 12
    """Attention heads of the encoder."""
    encoder_head_dim: int = 64
    """Width of each encoder attention head."""
    encoder_mlp_dim: int = 256
    """Hidden width of the encoder's MLPs."""
    encoder_dropout: float = 0.0
    """Dropout in the encoder (embeddings, attention outputs, MLPs)."""
    encoder_patch_size: int = 8
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
    dit_hidden: int | None = None
    """DiT width, overriding the named size."""
    dit_depth: int | None = None
    """DiT depth, overriding the named size."""
    dit_heads: int | None = None
    """DiT heads, overriding the named size."""
    dit_patch_size: int = 2
    """Side of the DiT's square patches; divides `image_size`."""
    dit_gate_bias: float = 0.0
    """Initial bias of the DiT blocks' adaLN gates: 0 is adaLN-Zero, positive warm-starts."""
    image_size: int = 32
    """Side of the square images."""
    channels: int = 3
    """Image channels."""
    ns: int = 6
    """Images per set in training (each is generated from the other ns - 1); `FSDM.loss` checks
    the sets it is given against it."""
    learned_variance: bool = True
    """The denoiser also outputs the variance interpolation (2 * channels outputs); must agree
    with `DiffusionConfig.variance`."""
    unet_model_channels: int = 64
    """UNet channels of the first level (a multiple of 32)."""
    unet_channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    """UNet channel multiplier per level."""
    unet_num_res_blocks: int = 2
    """UNet residual blocks per level."""
    unet_attention_resolutions: tuple[int, ...] = (16, 8)
    """Feature-map sides at which the UNet attends."""
    unet_num_heads: int = 4
    """UNet attention heads."""
    unet_dropout: float = 0.2
    """Dropout in the UNet's residual blocks."""
    null_context_prob: float = 0.1
    """Probability that a training image sees the learned null context instead of its set's:
    the null-context model it trains is what classifier-free guidance
    (`DiffusionConfig.guidance_scale`) steers away from. 0 trains no null context."""
    remat: bool = False
    """Recompute activations in the backward pass instead of storing them, per DiT block, UNet
    residual and attention block, and around each encoder call: less memory, more compute."""

    def __post_init__(self) -> None:
        if not isinstance(cast(object, self.remat), bool):
            raise ValueError(f"ModelConfig.remat={self.remat!r} is not allowed; use True or False.")
        check_choice(self, "encoder", get_args(EncoderName))
        check_choice(self, "pooling", get_args(PoolingName))
        check_choice(self, "conditioning", get_args(ConditioningName))
        check_choice(self, "denoiser", get_args(DenoiserName))
        check_choice(self, "dit_size", (*get_args(DiTSize), None))
        positive = (
            "hdim",
            "encoder_depth",
            "encoder_heads",
            "encoder_head_dim",
            "encoder_mlp_dim",
            "encoder_patch_size",
            "dit_patch_size",
            "image_size",
            "channels",
            "unet_model_channels",
            "unet_num_res_blocks",
            "unet_num_heads",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"ModelConfig.{name}={value!r} is not allowed; it must be a positive integer."
                )
        for name in ("dit_hidden", "dit_depth", "dit_heads"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"ModelConfig.{name}={value!r} is not allowed; it must be None or a "
                    "positive integer."
                )
        check_range(self, "ns", low=2)
        check_range(self, "encoder_dropout", low=0.0, high=1.0, high_inclusive=False)
        check_range(self, "null_context_prob", low=0.0, high=1.0, high_inclusive=False)
        check_range(self, "unet_dropout", low=0.0, high=1.0, high_inclusive=False)
        check_range(self, "dit_gate_bias")
        if (self.conditioning == "lag") != (self.pooling == "mean_patch"):
            raise ValueError(
                f"ModelConfig.conditioning={self.conditioning!r} is not allowed with "
                f"pooling={self.pooling!r}; LAG attends to one token per patch position: use "
                "conditioning='lag' with pooling='mean_patch', and 'film' with 'cls', 'mean' "
                "or 'sum'."
            )
        if self.image_size % self.encoder_patch_size:
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
        else:
            if self.unet_model_channels % 32:
                raise ValueError(
                    f"ModelConfig.unet_model_channels={self.unet_model_channels} is not allowed; "
                    "it must be a multiple of 32 (GroupNorm with 32 groups)."
                )
            if not self.unet_channel_mult or min(self.unet_channel_mult) < 1:
                raise ValueError(
                    f"ModelConfig.unet_channel_mult={self.unet_channel_mult!r} is not allowed; "
                    "give one positive multiplier per level."
                )

    @property
    def dit_dims(self) -> tuple[int, int, int]:
        """The DiT's (hidden width, depth, heads): the named size with explicit overrides."""
        named = {"S": (384, 12, 6), "B": (768, 12, 12), None: (0, 0, 0)}[self.dit_size]
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
"""Named model configurations: `paper-cifar100`, also named after the reference run it
reproduces, `vfsddpm_cifar100_vit_film_mean_sigma` (ViT encoder, mean pooling, FiLM,
deterministic context, UNet with learned variance: FID 45.50 on unseen classes in the paper);
`vfsddpm_cifar100_vit_lag_meanpatch_sigma` (the paper's best run: the same ViT, its patch tokens
averaged over the set and read by the UNet's cross-attention (LAG), deterministic: FID 35.07);
`dit-s-cifar100` (the FiLM encoder with DiT-S/2) and `smoke` (tiny networks on the same 32x32
sets of 6, compiles in seconds on a CPU)."""


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

    num_sets: int = 2000
    """Support sets drawn for the FID protocol (10,000 real images at ns = 5)."""
    ns: int = 5
    """Real images per support set."""
    samples_per_set: int = 5
    """Images generated from each support set (10,000 in all at the defaults)."""
    sampler: SamplerName = "ddpm"
    """Sampler used to generate: `ddpm` ancestral (the reference), `ddim` or `ode`."""
    sampling_steps: int = 250
    """Respaced sampling steps (250 in the reference)."""
    seed: int = 0
    """Seed of the support sets, the generation keys and the KID subsets."""
    generate_batch_size: int = 32
    """Support sets per generation call (one compiled shape; the last batch is padded)."""
    feature_batch_size: int = 250
    """Images per call of the feature extractor."""
    kid_subset_size: int = 1000
    """Rows per KID subset (torch-fidelity's default)."""
    kid_num_subsets: int = 100
    """Number of KID subsets."""
    pr_neighbours: int = 3
    """k of the k-nearest-neighbour manifolds of precision/recall (Kynkaanniemi et al.)."""
    inception_weights: str | None = None
    """A local FID Inception weights file; None downloads (checksum-verified) and caches it."""
    eval_split: SplitPart = "test"
    """Classes of the few-shot figures: `test` or `val` (unseen, labelled "out-distro") or
    `train` (labelled "in-distro")."""
    likelihood_sets: int = 2000
    """Sets whose images are scored in bits/dim, each under its leave-one-out context."""
    likelihood_steps: int | None = None
    """Timesteps of the variational bound: None for all T, else a respaced subset."""
    likelihood_batch_size: int = 16
    """Sets per likelihood call."""
    probe_episodes: int = 10
    """Episodes of the classification probe (one support set per class per episode)."""
    probe_queries_per_class: int = 15
    """Query images per class per episode, disjoint from that episode's support set."""

    def __post_init__(self) -> None:
        names = (
            "num_sets",
            "ns",
            "samples_per_set",
            "sampling_steps",
            "seed",
            "generate_batch_size",
            "feature_batch_size",
            "kid_subset_size",
            "kid_num_subsets",
            "pr_neighbours",
            "likelihood_sets",
            "likelihood_batch_size",
            "probe_episodes",
            "probe_queries_per_class",
        )
        for name in names:
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(
                    f"EvalConfig.{name}={getattr(self, name)!r} is not allowed; "
                    "it must be an integer."
                )
            check_range(self, name, low=0 if name == "seed" else 1)
        check_range(self, "ns", low=2)
        check_range(self, "kid_subset_size", low=2)
        check_choice(self, "sampler", get_args(SamplerName))
        check_choice(self, "eval_split", get_args(SplitPart))
        steps = cast(object, self.likelihood_steps)
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise ValueError(
                    f"EvalConfig.likelihood_steps={steps!r} is not allowed; "
                    "it must be an integer or None (all timesteps)."
                )
            check_range(self, "likelihood_steps", low=1)


WandbMode = Literal["auto", "online", "offline", "disabled"]


@no_type_check
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The training loop: run length, where checkpoints and metrics go, and how often."""

    run_dir: str = "runs/default"
    """Directory of the run's checkpoints and metrics; a run restarted on it resumes."""
    num_steps: int = 1000
    """Training steps of the whole run (a resumed run continues to this total)."""
    log_every: int = 100
    """Metrics are pulled to the host and logged every this many steps."""
    eval_every: int = 1000
    """`eval_fn` runs every this many steps; 0 never evaluates."""
    save_every: int = 1000
    """A checkpoint is written every this many steps (and at the end); 0 saves at the end only."""
    keep_checkpoints: int = 3
    """The last this many checkpoints are kept."""
    seed: int = 0
    """Root seed of the run (model initialisation, training keys, the set sampler)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement of the monitored metric (`fid` when
    the run computes it during training, else `eval_loss`); 0 disables."""
    early_stopping_min_delta: float = 0.0
    """An evaluation improves only when the monitored metric falls by more than this."""
    keep_best: bool = True
    """Keep the checkpoint of the best monitored metric under `run_dir/best/`."""
    progress: bool = True
    """Show a progress bar with steps/s and the ETA."""
    sample_every: int = 1000
    """`images_fn` runs and its images are logged every this many steps; 0 never."""
    wandb: WandbMode = "auto"
    """Weights & Biases: `auto` is online when credentials exist and offline otherwise;
    `disabled` creates no W&B run (metrics and images are still written under `run_dir`)."""
    wandb_project: str = "fsdm_eqx"
    """W&B project of the run."""
    wandb_entity: str | None = None
    """W&B entity (user or team); None uses the account's default."""
    wandb_init_timeout: float = 30.0
    """Seconds to wait for the W&B server before falling back to an offline run."""

    def __post_init__(self) -> None:
        run_dir = cast(object, self.run_dir)
        if not isinstance(run_dir, str) or not run_dir:
            raise ValueError(
                f"RunConfig.run_dir={self.run_dir!r} is not allowed; it must be a non-empty path."
            )
        for name in ("num_steps", "log_every", "keep_checkpoints"):
            check_range(self, name, low=1)
        for name in (
            "eval_every",
            "save_every",
            "seed",
            "early_stopping_patience",
            "sample_every",
        ):
            check_range(self, name, low=0)
        for name in (
            "num_steps",
            "log_every",
            "eval_every",
            "save_every",
            "keep_checkpoints",
            "seed",
            "early_stopping_patience",
            "sample_every",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"RunConfig.{name}={value!r} is not allowed; it must be an integer."
                )
        for name in ("progress", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"RunConfig.{name}={getattr(self, name)!r} is not allowed; "
                    "it must be True or False."
                )
        check_range(self, "early_stopping_min_delta", low=0.0)
        check_choice(self, "wandb", get_args(WandbMode))
        project = cast(object, self.wandb_project)
        if not isinstance(project, str) or not project:
            raise ValueError(
                f"RunConfig.wandb_project={self.wandb_project!r} is not allowed; "
                "it must be a non-empty name."
            )
        entity = cast(object, self.wandb_entity)
        if entity is not None and (not isinstance(entity, str) or not entity):
            raise ValueError(
                f"RunConfig.wandb_entity={self.wandb_entity!r} is not allowed; "
                "it must be a non-empty name or None."
            )
        check_range(self, "wandb_init_timeout", low=0, low_inclusive=False)
