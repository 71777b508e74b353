"""Frozen configuration dataclasses, validated on construction.

Every config checks its own fields in ``__post_init__``: a bad value raises one ``ValueError`` that
names the field, the value given and what is allowed. The experiment CLI is generated from these
dataclasses, so they are the single list of settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal, get_args

ScheduleName = Literal["linear", "cosine"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["mse", "hybrid"]
SamplerName = Literal["ddpm", "ddim", "ode"]


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
    clip_denoised: bool = True
    """Clip the predicted x_0 to [-1, 1] at every sampling step."""

    def __post_init__(self) -> None:
        check_range(self, "num_steps", low=2)
        check_choice(self, "schedule", get_args(ScheduleName))
        check_choice(self, "variance", get_args(VarianceType))
        check_choice(self, "loss", get_args(LossType))
        check_choice(self, "sampler", get_args(SamplerName))
        check_range(self, "vlb_weight", low=0.0)
        check_range(self, "sampling_steps", low=1, high=self.num_steps)
        check_range(self, "ddim_eta", low=0.0, high=1.0)
        check_range(self, "ode_rtol", low=0.0, low_inclusive=False)
        check_range(self, "ode_atol", low=0.0, low_inclusive=False)
        for name in ("num_steps", "sampling_steps"):
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


DatasetName = Literal["cifar100", "omniglot", "mnist"]
ClassSplitName = Literal["fc100", "random", "background_evaluation"]
SplitPart = Literal["train", "val", "test"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset, its class-disjoint few-shot split and the set sampler that feeds training."""

    dataset: DatasetName = "cifar100"
    """`cifar100` (32x32 RGB), `omniglot` (background/evaluation characters) or `mnist`."""
    data_dir: str | None = None
    """A local copy (archive, extracted folder or .npz); None downloads into `cache_dir`."""
    cache_dir: str | None = None
    """Download cache; None uses $FSDM_EQX_CACHE or ~/.cache/fsdm_eqx."""
    download: bool = True
    """Whether missing files may be downloaded."""
    class_split: ClassSplitName = "fc100"
    """`fc100` (CIFAR-100 by superclass, 60/20/20), `random` (seeded, 60/20/20 of the classes),
    or `background_evaluation` (Omniglot's official split)."""
    split_seed: int = 0
    """Seed of the `random` class split."""
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
        if self.class_split == "background_evaluation" and self.split == "val":
            raise ValueError(
                "DataConfig.split='val' is not allowed with class_split='background_evaluation'; "
                "Omniglot's official split has no validation classes: use 'train' or 'test'."
            )


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
    """Classes of the "out-distro" figures; the "in-distro" ones use `train`."""
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
        if self.likelihood_steps is not None:
            if isinstance(self.likelihood_steps, bool) or not isinstance(
                self.likelihood_steps, int
            ):
                raise ValueError(
                    f"EvalConfig.likelihood_steps={self.likelihood_steps!r} is not allowed; "
                    "it must be an integer or None (all timesteps)."
                )
            check_range(self, "likelihood_steps", low=1)
