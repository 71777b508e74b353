"""The configuration of one few-shot experiment and its named presets.

`ExperimentConfig` composes the model, diffusion, optimiser, data and evaluation configs with the
run settings; `PRESETS` names the paper's runs and a smoke test; `experiment_config_from_dict`
reads a configuration back from ``config.json`` or a checkpoint's metadata.
"""

import dataclasses
from typing import Any, Literal

from .._custom_types import NonNegativeInt, PositiveInt
from ..config import (
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    check_fields,
    check_range,
    model_preset,
    no_type_check,
)

__all__ = ["PRESETS", "ExperimentConfig", "curve_every", "experiment_config_from_dict"]


@no_type_check
@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one few-shot run needs: the five component configs and the run settings."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: model_preset("paper-cifar100"))
    """The networks."""
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    """The diffusion process, loss and training-time sampler."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """AdamW, schedule and EMA."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Dataset, class split and training sets."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Few-shot evaluation protocol on unseen classes."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run length, directory (re-using it resumes), logging, evaluation and checkpoint intervals."""
    eval_loss_batches: PositiveInt = 10
    """Batches of validation-class sets scored by the EMA model's training loss."""
    fid: bool = True
    """Compute few-shot FID/KID/precision/recall on the `eval.eval_split` classes (needs the
    Inception weights: `eval.inception_weights` or a download)."""
    fid_in_distro: bool = True
    """Also score the final few-shot FID on training classes (``fid_in_distro``), as the paper
    reports beside the unseen-class figure."""
    likelihood: bool = True
    """Score the bits/dim of `eval.eval_split` images under their leave-one-out contexts at the
    end (`eval.likelihood_*`), as the paper reports."""
    probe: bool = True
    """Run the few-shot classification probe on the `eval.eval_split` classes at every
    evaluation and at the end: each query image is given the class whose support-set context is
    nearest to its own context."""
    final_checkpoint: Literal["last", "best"] = "last"
    """The EMA model the final evaluation scores: the last step's, or the best evaluation's
    (`run_dir/best/`, kept with `run.keep_best`; the last one when there is none)."""
    grid_sets: PositiveInt = 8
    """Support sets of unseen classes shown in ``samples.png`` (each as a row of support images
    over a row of generated ones), logged as ``generation/set_{i}`` every `run.sample_every`
    steps and as ``fid_eval/example_{i}`` after the FID; as many training sets are logged as
    ``train/support_target_set_{i}``."""
    visual_sets: NonNegativeInt = 2
    """Of those sets, how many get the encoder's attention maps, rollout and saliency at every
    evaluation (`run.eval_every`); 0 turns the encoder visuals off."""
    histogram_paths: NonNegativeInt = 64
    """At every evaluation, histograms of the gradient and of the optimiser's update of this many
    parameter paths (evenly spread over the model, on a fixed training batch); 0 turns them off."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range(self, "visual_sets", low=0, high=self.grid_sets)
        fid_every, eval_every = self.run.fid_every, self.run.eval_every
        if fid_every and (not eval_every or fid_every % eval_every):
            raise ValueError(
                f"ExperimentConfig has run.fid_every={fid_every} but run.eval_every={eval_every}; "
                "the FID curve is computed at evaluations: make fid_every a multiple of "
                "eval_every, or 0 to turn it off."
            )
        if self.model.ns != self.data.ns:
            raise ValueError(
                f"ExperimentConfig has model.ns={self.model.ns} but data.ns={self.data.ns}; the "
                "model trains on the sets the data gives: set both to the same size."
            )
        if self.model.learned_variance != self.diffusion.learned_variance:
            raise ValueError(
                f"ExperimentConfig has model.learned_variance={self.model.learned_variance} but "
                f"diffusion.variance={self.diffusion.variance!r}; use 'learned_range' with a "
                "learned variance and a fixed variance otherwise."
            )
        if self.model.image_size != self.data.image_size:
            raise ValueError(
                f"ExperimentConfig has model.image_size={self.model.image_size} but "
                f"data.image_size={self.data.image_size}; set both to the same size."
            )


PRESETS: dict[str, ExperimentConfig] = {
    "paper-cifar100": ExperimentConfig(
        model=model_preset("paper-cifar100"),
        diffusion=DiffusionConfig(
            num_steps=1000, schedule="linear", variance="learned_range", loss="hybrid"
        ),
        optim=OptimConfig(lr=1e-4, ema_decay=0.995),
        data=DataConfig(dataset="cifar100", class_split="fc100", batch_size=32, ns=6),
        eval=EvalConfig(),
        run=RunConfig(
            run_dir="runs/paper-cifar100", num_steps=100_000, save_every=5000, eval_every=5000
        ),
    ),
    "smoke": ExperimentConfig(
        model=model_preset("smoke"),
        diffusion=DiffusionConfig(num_steps=100, sampling_steps=10),
        optim=OptimConfig(lr=1e-3, ema_start=0, ema_every=1, ema_decay=0.9),
        data=DataConfig(dataset="cifar100", class_split="fc100", batch_size=4, ns=6, prefetch=0),
        eval=EvalConfig(
            num_sets=2,
            ns=5,
            samples_per_set=5,
            sampling_steps=10,
            generate_batch_size=2,
            feature_batch_size=50,
            kid_subset_size=10,
            kid_num_subsets=10,
            probe_episodes=2,
            probe_queries_per_class=5,
            likelihood_sets=2,
            likelihood_steps=10,
            likelihood_batch_size=2,
            curve_sets=2,
            curve_sampling_steps=10,
        ),
        run=RunConfig(
            run_dir="runs/smoke",
            num_steps=10,
            log_every=5,
            save_every=5,
            eval_every=10,
            sample_every=5,
            wandb="offline",
        ),
        eval_loss_batches=2,
        grid_sets=4,
    ),
    "omniglot": ExperimentConfig(
        model=dataclasses.replace(model_preset("dit-s-cifar100"), channels=1),
        data=DataConfig(
            dataset="omniglot", class_split="background_evaluation", image_size=32, ns=6
        ),
        run=RunConfig(run_dir="runs/omniglot", num_steps=100_000, save_every=5000),
    ),
    "mnist": ExperimentConfig(
        model=dataclasses.replace(
            model_preset("dit-s-cifar100"), channels=1, image_size=28, encoder_patch_size=7
        ),
        data=DataConfig(dataset="mnist", class_split="random", image_size=28, ns=6),
        run=RunConfig(run_dir="runs/mnist", num_steps=100_000, save_every=5000),
    ),
}
for _run in (
    "vfsddpm_cifar100_vit_film_mean_sigma",
    "vfsddpm_cifar100_vit_lag_meanpatch_sigma",
    "vfsddpm_cifar100_vit_lag_agg_sigma",
    "vfsddpm_cifar100_vit_lag_none_sigma",
    "vfsddpm_cifar100_vitset_lag_none_sigma",
    "vfsddpm_cifar100_unet_film_mean_sigma",
    "vfsddpm_cifar100_unet_film_mean_vi",
    "dit-s-cifar100",
):
    PRESETS[_run] = dataclasses.replace(
        PRESETS["paper-cifar100"],
        model=model_preset(_run),
        run=dataclasses.replace(PRESETS["paper-cifar100"].run, run_dir=f"runs/{_run}"),
    )
PRESETS["vfsddpm_cifar100_vit_lag_none_sigma"] = dataclasses.replace(
    PRESETS["vfsddpm_cifar100_vit_lag_none_sigma"],
    data=dataclasses.replace(PRESETS["paper-cifar100"].data, batch_size=24),  # as the reference
)
"""Named experiments: `paper-cifar100` (the reference code's configuration: UNet, ViT encoder
with FiLM on the mean-pooled, deterministic context, learned variance, T = 1000 linear, AdamW at
1e-4, EMA 0.995, 32 sets of 6 per batch, the paper's FID protocol), the same training under the
names of the reference runs it reproduces (`vfsddpm_cifar100_vit_film_mean_sigma`, and the best,
`vfsddpm_cifar100_vit_lag_meanpatch_sigma`: LAG on mean-pooled patch tokens), the reference's
other CIFAR-100 runs with the model presets of their names (`..._vit_lag_agg_sigma`,
`..._vit_lag_none_sigma` with 24 sets per batch, `..._vitset_lag_none_sigma`,
`..._unet_film_mean_sigma`, `..._unet_film_mean_vi`), `dit-s-cifar100` (the paper's training
with the DiT-S/2 denoiser, the preset `experiments/sweep.yaml` tunes), `omniglot`, `mnist`, and
`smoke` (tiny networks and a tiny evaluation that run the whole path in minutes on
a CPU)."""


def curve_every(config: ExperimentConfig) -> int:
    """Steps between two points of the FID curve during training; 0 when there is none."""
    if not config.fid or not config.run.eval_every:
        return 0
    every = config.run.fid_every
    return config.run.eval_every if every is None else every


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def experiment_config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuild an `ExperimentConfig` from ``dataclasses.asdict`` output read back from JSON.

    **Arguments:**
    - `values`: the ``experiment`` entry of ``config.json`` or of a checkpoint's metadata.

    **Returns:** the configuration (JSON lists become the tuples the configs hold); it raises
    `ValueError` or `TypeError` when a field is unknown or a value is not allowed.
    """
    parts = {
        "model": ModelConfig,
        "diffusion": DiffusionConfig,
        "optim": OptimConfig,
        "data": DataConfig,
        "eval": EvalConfig,
        "run": RunConfig,
    }
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in parts:
            kwargs[name] = parts[name](**{k: _as_tuples(v) for k, v in value.items()})
        else:
            kwargs[name] = value
    return ExperimentConfig(**kwargs)
