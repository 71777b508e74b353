"""The few-shot experiment: train FSDM on training classes, evaluate on unseen classes.

`ExperimentConfig` composes the model, diffusion, optimiser, data and evaluation configs with the
run settings; `run_experiment` loads the data, builds the model, trains (resuming from the run
directory when it holds a checkpoint), evaluates the EMA model and writes ``config.json``,
``metrics.json``, ``metrics.jsonl`` and ``samples.png`` under the run directory. `main` is the
command line, generated from the dataclasses by `tyro`, with a ``--preset`` choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, PRNGKeyArray, Shaped, UInt8

from .config import (
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    check_range,
    model_preset,
    no_type_check,
)
from .data.download import DataError
from .data.pipeline import load_dataset, make_sampler
from .instrument import (
    Sink,
    Visuals,
    collect_visuals,
    fid_eval_figure,
    generation_figure,
    make_sink,
    support_target_figure,
)
from .metrics._inception_weights import InceptionWeightsError
from .metrics.fewshot import draw_support_sets, fewshot_fid, to_uint8
from .metrics.probe import fewshot_probe
from .nn.fsdm import FSDM, count_parameters
from .train import (
    fsdm_loss_fn,
    init_train_state,
    initialize_distributed,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
    train,
)
from .train.checkpoint import CheckpointError, read_checkpoint_metadata, resumable_checkpoint


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
    eval_loss_batches: int = 10
    """Batches of validation-class sets scored by the EMA model's training loss."""
    fid: bool = True
    """Compute few-shot FID/KID/precision/recall on the `eval.eval_split` classes (needs the
    Inception weights: `eval.inception_weights` or a download)."""
    probe: bool = True
    """Run the few-shot classification probe on the `eval.eval_split` classes: each query image is
    given the class whose support-set context is nearest to its own context."""
    grid_sets: int = 8
    """Support sets of unseen classes shown in ``samples.png`` (each as a row of support images
    over a row of generated ones), logged as ``generation/set_{i}`` every `run.sample_every`
    steps and as ``fid_eval/example_{i}`` after the FID; as many training sets are logged as
    ``train/support_target_set_{i}``."""
    visual_sets: int = 2
    """Of those sets, how many get the encoder's attention maps, rollout and saliency at every
    evaluation (`run.eval_every`); 0 turns the encoder visuals off."""

    def __post_init__(self) -> None:
        for name in ("eval_loss_batches", "grid_sets"):
            check_range(self, name, low=1)
        check_range(self, "visual_sets", low=0, high=self.grid_sets)
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
for _run in ("vfsddpm_cifar100_vit_film_mean_sigma", "vfsddpm_cifar100_vit_lag_meanpatch_sigma"):
    PRESETS[_run] = dataclasses.replace(
        PRESETS["paper-cifar100"],
        model=model_preset(_run),
        run=dataclasses.replace(PRESETS["paper-cifar100"].run, run_dir=f"runs/{_run}"),
    )
"""Named experiments: `paper-cifar100` (the reference code's configuration: UNet, ViT encoder
with FiLM on the mean-pooled, deterministic context, learned variance, T = 1000 linear, AdamW at
1e-4, EMA 0.995, 32 sets of 6 per batch, the paper's FID protocol), the same training under the
names of the reference runs it reproduces (`vfsddpm_cifar100_vit_film_mean_sigma`, and the best,
`vfsddpm_cifar100_vit_lag_meanpatch_sigma`: LAG on mean-pooled patch tokens), `omniglot`,
`mnist`, and `smoke` (tiny networks and a tiny evaluation that run the whole path in minutes on
a CPU)."""


def image_rows(rows: Sequence[np.ndarray]) -> UInt8[np.ndarray, "H W c"]:
    """Rows of images (channels first) laid out as one image with 2-pixel white borders.

    **Arguments:**
    - `rows`: one uint8 array `(k, c, h, w)` per row; rows may hold different numbers `k`.

    **Returns:** one uint8 image, channels last, as wide as the longest row.
    """
    _, c, h, w = rows[0].shape
    cols = max(len(row) for row in rows)
    pad = 2
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, images in enumerate(rows):
        for j, image in enumerate(images):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = image.transpose(1, 2, 0)
    return out


def _grid(
    support: UInt8[np.ndarray, "s m c h w"], generated: UInt8[np.ndarray, "s k c h w"]
) -> UInt8[np.ndarray, "H W c"]:
    """One image: for each set, its support images in a row over its generated images."""
    return image_rows([row for pair in zip(support, generated, strict=True) for row in pair])


def write_png(path: Path, image: UInt8[np.ndarray, "H W c"]) -> None:
    """Write a uint8 image, channels last (one channel is written as gray)."""
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(array).save(path)


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


FID_METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall")
"""The figures of the few-shot protocol, under the same names in ``metrics.json`` and the sinks."""

SUMMARY_METRICS = (
    ("step", "steps trained"),
    ("train_seconds", "training time (s)"),
    ("train/loss", "training loss (last logged)"),
    ("eval_loss", "EMA loss, validation classes"),
    ("fid", "few-shot FID, unseen classes"),
    ("kid_mean", "KID (mean)"),
    ("kid_std", "KID (std)"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("fid_seconds", "FID evaluation time (s)"),
    ("probe_accuracy", "few-shot probe accuracy"),
    ("probe_top5_accuracy", "few-shot probe top-5 accuracy"),
)
"""The rows of the summary printed at the end of a run (`debug/` and system metrics stay in
``metrics.json`` and the sinks)."""


def _summary(metrics: dict[str, Any]) -> str:
    rows = [(label, metrics[name]) for name, label in SUMMARY_METRICS if name in metrics]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{label.ljust(width)}  {value:.6g}" for label, value in rows]
    return "\n".join(lines)


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Train, evaluate and write the results of one few-shot experiment.

    A run directory that holds a checkpoint is resumed from its step; a finished run only
    re-evaluates.

    **Arguments:**
    - `config`: the experiment.

    **Returns:** the metrics written to ``metrics.json``: the last training metrics
    (``train/...``), ``eval_loss`` of the EMA model on the validation classes, the few-shot
    ``fid``, ``kid_mean``, ``kid_std``, ``precision`` and ``recall`` on `eval.eval_split`
    classes, parameter counts and timings.
    """
    weights = config.eval.inception_weights
    if config.fid and weights is not None and not Path(weights).is_file():
        raise InceptionWeightsError(
            f"EvalConfig.inception_weights={weights!r} is not a file; give the FID Inception "
            "weights file, leave it unset to download them, or turn FID off with --no-fid."
        )
    run_dir = Path(config.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data, split = load_dataset(config.data)
    metadata = {"experiment": dataclasses.asdict(config), "class_split": split.to_dict()}
    (run_dir / "config.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))

    key = jax.random.PRNGKey(config.run.seed)
    model_key, train_key, eval_key = jax.random.split(key, 3)
    model = FSDM(config.model, key=model_key)
    state = init_train_state(model, config.optim, key=train_key, total_steps=config.run.num_steps)
    mesh = make_mesh()
    state = replicate(state, mesh)
    loss_fn = fsdm_loss_fn(config.diffusion)
    step_fn = make_train_step(loss_fn, config.optim, total_steps=config.run.num_steps, mesh=mesh)
    sampler = make_sampler(
        config.data, data, split, host_index=jax.process_index(), host_count=jax.process_count()
    )
    # The checkpoint `train` resumes from: the newest intact one (damaged ones are named).
    last = resumable_checkpoint(run_dir)
    start = 0 if last is None else int(read_checkpoint_metadata(last)["step"])

    eval_classes = split.classes(config.eval.eval_split)
    eval_mask = np.isin(data.labels, eval_classes)
    eval_images, eval_labels = data.images[eval_mask], data.labels[eval_mask]
    support, real = _fixed_examples(config, eval_images, eval_labels, eval_classes)
    train_sets = _fixed_train_sets(config, data, split)
    sample_config = dataclasses.replace(
        config.diffusion,
        sampler=config.eval.sampler,
        sampling_steps=min(config.eval.sampling_steps, config.diffusion.num_steps),
    )
    generate_sets = _generate_sets_fn(config.eval.samples_per_set, sample_config)
    image_keys = jax.random.split(jax.random.PRNGKey(config.eval.seed), config.grid_sets)
    eval_loss = _eval_loss_fn(config, data, split, eval_key)
    evaluated: dict[int, dict[str, float]] = {}

    def eval_fn(state: Any) -> dict[str, float]:
        ema = eqx.nn.inference_mode(state.ema)
        evaluated[int(state.step)] = {"eval_loss": eval_loss(ema)}
        return evaluated[int(state.step)]

    def images_fn(state: Any) -> dict[str, np.ndarray]:
        ema = eqx.nn.inference_mode(state.ema)
        generated = np.asarray(generate_sets(ema, jnp.asarray(support), image_keys))
        images = {
            f"train/support_target_set_{i}": support_target_figure(x_set, i % len(x_set))
            for i, x_set in enumerate(train_sets)
        }
        for i, (s, g) in enumerate(zip(support, generated, strict=True)):
            images[f"generation/set_{i}"] = generation_figure(s, g)
        return images

    def visuals_fn(state: Any) -> Visuals:
        return collect_visuals(
            eqx.nn.inference_mode(state.ema),
            jnp.asarray(support[: config.visual_sets]),
            layers=sorted({0, config.model.encoder_depth - 1}),
            heads=(0,),
            key=jax.random.PRNGKey(config.eval.seed),
        )

    sink = make_sink(config.run, name=run_dir.name, config=dataclasses.asdict(config))
    try:
        t0 = time.perf_counter()
        state = train(
            state,
            step_fn,
            lambda step: sampler.batch(step)[0],
            config=config.run,
            sink=sink,
            eval_fn=eval_fn,
            metadata=metadata,
            place_batch=lambda batch: shard_batch(batch, mesh),
            skip_nonfinite=config.optim.skip_nonfinite,
            images_fn=images_fn,
            visuals_fn=visuals_fn if config.visual_sets else None,
        )
        train_seconds = time.perf_counter() - t0
        results = _evaluate(
            config,
            state,
            start=start,
            train_seconds=train_seconds,
            cached_eval=evaluated.get(int(state.step)),
            eval_loss=eval_loss,
            examples=(support, real, train_sets),
            generate=lambda ema: np.asarray(generate_sets(ema, jnp.asarray(support), image_keys)),
            eval_data=(eval_images, eval_labels, eval_classes),
            class_names=data.class_names,
            sample_config=sample_config,
            sink=sink,
        )
    finally:
        sink.close()
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(_summary(results), flush=True)
    return results


def _evaluate(
    config: ExperimentConfig,
    state: Any,
    *,
    start: int,
    train_seconds: float,
    cached_eval: dict[str, float] | None,
    eval_loss: Callable[[FSDM], float],
    examples: tuple[np.ndarray, np.ndarray, np.ndarray],
    generate: Callable[[FSDM], np.ndarray],
    eval_data: tuple[np.ndarray, np.ndarray, Sequence[int]],
    class_names: Sequence[str],
    sample_config: DiffusionConfig,
    sink: Sink,
) -> dict[str, Any]:
    """The final evaluation of the EMA model: loss, sample grid, few-shot FID, the probe."""
    run_dir = Path(config.run.run_dir)
    step = int(state.step)
    ema = eqx.nn.inference_mode(state.ema)
    results: dict[str, Any] = {"step": step, "resumed_from": start, "train_seconds": train_seconds}
    results |= {f"train/{k}": v for k, v in _last_logged(run_dir / "metrics.jsonl").items()}
    results |= {f"parameters/{k}": v for k, v in count_parameters(ema).items()}
    results["eval_loss"] = eval_loss(ema) if cached_eval is None else cached_eval["eval_loss"]

    support, real, _ = examples
    generated = generate(ema)
    grid = _grid(to_uint8(support), to_uint8(generated))
    write_png(run_dir / "samples.png", grid)
    results["samples_png"] = str(run_dir / "samples.png")
    sink.log_images({"samples/grid": grid}, step)

    images, labels, classes = eval_data
    if config.fid:
        t1 = time.perf_counter()

        def generate_one(s: Float[Array, "m c h w"], key: PRNGKeyArray) -> Float[Array, "k c h w"]:
            return ema.sample(
                s, config.eval.samples_per_set, key=key, diffusion_config=sample_config
            )

        fid = fewshot_fid(
            generate_one,
            images,
            labels,
            seen_in_training=config.eval.eval_split == "train",
            config=config.eval,
            classes=classes,
        )
        # One name per figure: metrics.json, the sinks and the summary use the same keys.
        scores = {name: float(getattr(fid, name)) for name in FID_METRICS}
        results |= scores
        results["fid_detail"] = fid.to_dict()
        results["fid_seconds"] = time.perf_counter() - t1
        sink.log(
            {**scores, **{f"fid/{class_names[c]}": v for c, v in fid.fid_per_class.items()}},
            step,
        )
        sink.log_images(
            {
                f"fid_eval/example_{i}": fid_eval_figure(s, g, r)
                for i, (s, g, r) in enumerate(zip(support, generated, real, strict=True))
            },
            step,
        )
    if config.probe:

        def embed(x_set: Float[Array, "m c h w"]) -> Array:
            # An encoder with a timestep token is read at t = 0, the clean images.
            t = jnp.zeros(()) if config.model.encoder_time_token else None
            return ema.context(x_set, t, inference=True).c

        probe = fewshot_probe(
            embed,
            images,
            labels,
            classes=classes,
            ns=config.eval.ns,
            num_episodes=config.eval.probe_episodes,
            queries_per_class=config.eval.probe_queries_per_class,
            seed=config.eval.seed,
        )
        results["probe_accuracy"] = probe.accuracy
        results["probe_top5_accuracy"] = probe.top5_accuracy
        sink.log(
            {"probe_accuracy": probe.accuracy, "probe_top5_accuracy": probe.top5_accuracy}, step
        )
    final = {name: results[name] for name, _ in SUMMARY_METRICS if name in results}
    sink.log({f"final/{k}": float(v) for k, v in final.items() if k != "step"}, step)
    return results


def _fixed_examples(
    config: ExperimentConfig,
    images: UInt8[np.ndarray, "n c h w"],
    labels: Integer[np.ndarray, " n"],
    classes: Sequence[int],
) -> tuple[Float[np.ndarray, "s m c h w"], Float[np.ndarray, "s k c h w"]]:
    """Support sets of the evaluation classes, chosen once, and as many other real images of each
    set's class as are generated from it (the figures compare the same sets across steps)."""
    m, k = config.eval.ns, config.eval.samples_per_set
    sets = draw_support_sets(
        labels, classes, num_sets=config.grid_sets, ns=m + k, seed=config.eval.seed
    )
    drawn = images[sets.indices].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return drawn[:, :m], drawn[:, m:]


def _fixed_train_sets(
    config: ExperimentConfig, data: Any, split: Any
) -> Float[np.ndarray, "s ns c h w"]:
    """Training sets shown with their target image, chosen once."""
    data_config = dataclasses.replace(
        config.data, batch_size=config.grid_sets, flips=False, prefetch=0, seed=config.eval.seed
    )
    return np.asarray(make_sampler(data_config, data, split).batch(0)[0])


def _generate_sets_fn(
    num: int, sample_config: DiffusionConfig
) -> Callable[[FSDM, Array, Array], Array]:
    """A compiled ``(model, supports, keys) -> generated``: ``num`` images for each set."""

    @eqx.filter_jit
    def generate_sets(
        model: FSDM, supports: Float[Array, "s m c h w"], keys: Shaped[Array, "s ..."]
    ) -> Float[Array, "s k c h w"]:
        def one(support: Float[Array, "m c h w"], key: PRNGKeyArray) -> Array:
            return model.sample(support, num, key=key, diffusion_config=sample_config)

        return jax.vmap(one)(supports, keys)

    return generate_sets


def _last_logged(path: Path) -> dict[str, float]:
    """The last line of training metrics (without evaluation-only lines)."""
    for line in reversed(path.read_text().splitlines() if path.exists() else []):
        record = json.loads(line)
        if "loss" in record:
            return {k: v for k, v in record.items() if k != "step"}
    return {}


def _eval_loss_fn(
    config: ExperimentConfig, data: Any, split: Any, key: PRNGKeyArray
) -> Callable[[FSDM], float]:
    """``ema -> loss``: the mean training loss of the EMA model on sets of validation classes
    (fixed batches), compiled once for every evaluation of the run."""
    sampler = make_sampler(
        dataclasses.replace(config.data, split="val", flips=False, prefetch=0), data, split
    )
    loss_fn = fsdm_loss_fn(config.diffusion)

    @eqx.filter_jit
    def batch_loss(model: FSDM, sets: Float[Array, "b ns c h w"], key: PRNGKeyArray) -> Array:
        keys = jax.random.split(key, sets.shape[0])
        losses, _ = jax.vmap(loss_fn, in_axes=(None, 0, 0))(model, sets, keys)
        return jnp.mean(losses)

    def eval_loss(ema: FSDM) -> float:
        total = 0.0
        for i in range(config.eval_loss_batches):
            sets, _ = sampler.batch(i)
            total += float(batch_loss(ema, jnp.asarray(sets), jax.random.fold_in(key, i)))
        return total / config.eval_loss_batches

    return eval_loss


def _parse_preset(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", default=None)
    known, rest = parser.parse_known_args(list(argv))
    return known.preset, rest


def main(argv: Sequence[str] | None = None, *, default_preset: str = "paper-cifar100") -> None:
    """The command line: ``--preset NAME`` picks the defaults, every field can be set.

    **Arguments:**
    - `argv`: the arguments (default ``sys.argv[1:]``).
    - `default_preset`: the preset used without ``--preset``.
    """
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    preset, rest = _parse_preset(argv)
    preset = default_preset if preset is None else preset
    if preset not in PRESETS:
        sys.exit(
            f"error: --preset {preset!r} is not known; choose one of "
            f"{', '.join(repr(n) for n in PRESETS)}."
        )
    description = (
        "Train few-shot diffusion (FSDM) and evaluate it on unseen classes.\n\n"
        f"--preset {{{','.join(PRESETS)}}}: the defaults below (now: {preset}; "
        f"default: {default_preset})."
    )
    try:
        config = tyro.cli(
            ExperimentConfig, args=rest, default=PRESETS[preset], description=description
        )
        initialize_distributed()  # joins a multi-host run described by the environment
        run_experiment(config)
    except (
        ValueError,
        DataError,
        InceptionWeightsError,
        CheckpointError,
        FileNotFoundError,
    ) as e:
        sys.exit(f"error: {e}")
