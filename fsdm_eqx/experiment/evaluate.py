"""Evaluation of a few-shot run: the inputs fixed for the whole run, the evaluations during
training and the final one.

`evaluate` scores the EMA model at the end of training: its loss on validation classes, the grid
``samples.png``, the few-shot FID protocol on unseen classes (and on training classes), the
bits/dim of unseen-class images and the classification probe. During training `fid_curve_fn`
gives a cheap FID on fixed sets and `probe_views` the probe's figures at every evaluation. The
helpers fix the support sets, training sets and validation batches once, so that every
evaluation of a run sees the same ones, and compile the generation and loss once.
"""

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, PRNGKeyArray, Shaped, UInt8

from ..config import DiffusionConfig, EvalConfig
from ..data.download import default_cache_dir
from ..data.pipeline import make_sampler
from ..data.pixels import to_float, to_uint8
from ..instrument import Sink, fid_eval_figure
from ..instrument.figures import samples_figure, write_png
from ..metrics.fewshot import FewShotFIDResult, draw_support_sets, fewshot_fid
from ..metrics.likelihood import fewshot_likelihood
from ..metrics.probe import fewshot_probe
from ..nn.fsdm import FSDM, count_parameters
from ..train import fsdm_loss_fn
from .config import ExperimentConfig

__all__ = [
    "FID_METRICS",
    "LIKELIHOOD_METRICS",
    "SUMMARY_METRICS",
    "EvalData",
    "eval_loss_fn",
    "evaluate",
    "fid_curve_fn",
    "fid_scores",
    "fixed_examples",
    "fixed_train_sets",
    "generate_sets_fn",
    "probe_views",
    "summary_table",
]


FID_METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall", "diversity", "diversity_real")
"""The figures of the few-shot protocol, under the same names in ``metrics.json`` and the sinks
(with ``_in_distro`` appended for training classes)."""

LIKELIHOOD_METRICS = ("bpd", "bpd_sem", "prior_bpd", "decoder_bpd")
"""The bits/dim figures, logged as ``likelihood/<name>``."""

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
    ("diversity", "sample diversity (Inception distance within a set)"),
    ("diversity_real", "real diversity (the same, real images of a set)"),
    ("fid_seconds", "FID evaluation time (s)"),
    ("fid_in_distro", "few-shot FID, training classes"),
    ("likelihood/bpd", "bits/dim, unseen classes (leave-one-out context)"),
    ("probe_accuracy", "few-shot probe accuracy"),
    ("probe_top5_accuracy", "few-shot probe top-5 accuracy"),
)
"""The rows of the summary printed at the end of a run (`debug/` and system metrics stay in
``metrics.json`` and the sinks)."""


def summary_table(metrics: dict[str, Any]) -> str:
    """The `SUMMARY_METRICS` present in ``metrics``, one labelled row each, as printed text."""
    rows = [(label, metrics[name]) for name, label in SUMMARY_METRICS if name in metrics]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{label.ljust(width)}  {value:.6g}" for label, value in rows]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """The real images of one group of classes: uint8 images, their labels, the classes, their
    names (indexed by label) and whether training saw them."""

    images: UInt8[np.ndarray, "n c h w"]
    labels: Integer[np.ndarray, " n"]
    classes: Sequence[int]
    class_names: Sequence[str]
    seen_in_training: bool

    @property
    def tag(self) -> str:
        """The suffix of this group's metric names: none for unseen classes, ``_in_distro``."""
        return "_in_distro" if self.seen_in_training else ""


def reference_cache_dir(config: ExperimentConfig) -> Path:
    """Where the reference statistics of real images are kept: beside the dataset cache."""
    return default_cache_dir(config.data.cache_dir) / "reference_statistics"


class _Generator(eqx.Module):
    """The few-shot protocol's generator: ``num`` samples of the model from one support set. A
    PyTree, so that its generation compiles once for every evaluation of a run."""

    model: FSDM
    num: int = eqx.field(static=True)
    diffusion: DiffusionConfig = eqx.field(static=True)

    def __call__(
        self, support: Float[Array, "m c h w"], key: PRNGKeyArray
    ) -> Float[Array, "k c h w"]:
        return self.model.sample(support, self.num, key=key, diffusion_config=self.diffusion)


class _ProbeEmbedding(eqx.Module):
    """The probe's view of a set: the model's context in inference mode (an encoder with a
    timestep token read at t = 0, the clean images). `none` pooling gives a token per patch of
    every image: their mean is compared, since a one-image query and a support set have
    different numbers of tokens. A PyTree, so that it compiles once for every evaluation."""

    model: FSDM
    mean_tokens: bool = eqx.field(static=True)

    def __call__(self, x_set: Float[Array, "m c h w"]) -> Array:
        t = jnp.zeros(()) if self.model.time_token else None
        c = self.model.context(x_set, t, inference=True).c
        return c.mean(axis=0) if self.mean_tokens else c


def _fid(
    config: ExperimentConfig,
    ema: FSDM,
    data: EvalData,
    eval_config: EvalConfig,
    sample_config: DiffusionConfig,
) -> FewShotFIDResult:
    """The few-shot protocol of ``eval_config`` on ``data`` for the EMA model."""
    sample_config = dataclasses.replace(
        sample_config,
        sampler=eval_config.sampler,
        sampling_steps=min(eval_config.sampling_steps, sample_config.num_steps),
    )

    split = "train" if data.seen_in_training else config.eval.eval_split
    return fewshot_fid(
        _Generator(ema, eval_config.samples_per_set, sample_config),
        data.images,
        data.labels,
        seen_in_training=data.seen_in_training,
        config=eval_config,
        classes=data.classes,
        reference_cache=reference_cache_dir(config),
        reference_tag=f"{config.data.dataset}-{split}",
    )


def fid_scores(result: FewShotFIDResult, data: EvalData) -> dict[str, float]:
    """The `FID_METRICS` and each class's FID (``fid/<class name>``) of one result, named for
    its group of classes (`EvalData.tag`)."""
    scores = {f"{name}{data.tag}": float(getattr(result, name)) for name in FID_METRICS}
    per_class = {f"fid{data.tag}/{data.class_names[c]}": v for c, v in result.fid_per_class.items()}
    return scores | per_class


def fid_curve_fn(
    config: ExperimentConfig, data: EvalData, sample_config: DiffusionConfig
) -> Callable[[FSDM], dict[str, float]]:
    """``ema -> scores``: the cheap FID of the curve during training, on the same
    `EvalConfig.curve_sets` support sets every time, with `fid_seconds`, its cost per call."""
    curve = dataclasses.replace(
        config.eval,
        num_sets=config.eval.curve_sets,
        sampler=config.eval.curve_sampler,
        sampling_steps=config.eval.curve_sampling_steps,
    )

    def scores(ema: FSDM) -> dict[str, float]:
        t0 = time.perf_counter()
        result = fid_scores(_fid(config, ema, data, curve, sample_config), data)
        return result | {"fid_seconds": time.perf_counter() - t0}

    return scores


def probe_views(
    config: ExperimentConfig, ema: FSDM, data: EvalData, sink: Sink, step: int
) -> dict[str, float]:
    """The few-shot probe on ``data``'s classes: top-1 and top-5 accuracy and each class's
    accuracy (``Val/per_class_accuracy/<class name>``) returned, the confusion matrix logged to
    ``sink`` as ``Val/confusion_matrix``."""

    probe = fewshot_probe(
        _ProbeEmbedding(ema, mean_tokens=config.model.pooling == "none"),
        data.images,
        data.labels,
        classes=data.classes,
        ns=config.eval.ns,
        num_episodes=config.eval.probe_episodes,
        queries_per_class=config.eval.probe_queries_per_class,
        seed=config.eval.seed,
    )
    names = [data.class_names[c] for c in probe.classes]
    sink.log_confusion_matrix("Val/confusion_matrix", names, probe.confusion, step)
    per_class = {
        f"Val/per_class_accuracy/{data.class_names[c]}": v
        for c, v in probe.per_class_accuracy.items()
    }
    return {"probe_accuracy": probe.accuracy, "probe_top5_accuracy": probe.top5_accuracy} | (
        per_class
    )


def _likelihood(
    config: ExperimentConfig, ema: FSDM, data: EvalData, diffusion: DiffusionConfig
) -> dict[str, float]:
    """Bits/dim of ``data``'s images, each under its leave-one-out context (`LIKELIHOOD_METRICS`
    as ``likelihood/<name>``)."""
    time_token = config.model.encoder_time_token

    def condition(context_set: Float[Array, "m c h w"]) -> Callable[[Array, Array], Array]:
        def model_fn(x_t: Float[Array, "c h w"], t: Float[Array, ""]) -> Array:
            c = ema.context(context_set, t if time_token else None, inference=True).c
            return ema.denoiser(x_t, t, c, inference=True).astype(x_t.dtype)

        return model_fn

    result = fewshot_likelihood(
        condition,
        data.images,
        data.labels,
        diffusion=diffusion,
        config=config.eval,
        classes=data.classes,
        seen_in_training=data.seen_in_training,
    )
    return {f"likelihood/{name}": float(getattr(result, name)) for name in LIKELIHOOD_METRICS}


def evaluate(
    config: ExperimentConfig,
    state: Any,
    *,
    start: int,
    train_seconds: float,
    cached_eval: dict[str, float] | None,
    eval_loss: Callable[[FSDM], float],
    examples: tuple[np.ndarray, np.ndarray, np.ndarray],
    generate: Callable[[FSDM], np.ndarray],
    unseen: EvalData,
    seen: EvalData,
    sample_config: DiffusionConfig,
    sink: Sink,
) -> dict[str, Any]:
    """The final evaluation of the EMA model: loss, sample grid, few-shot FID on unseen classes
    (``unseen``) and on training classes (``seen``), bits/dim and the probe."""
    run_dir = Path(config.run.run_dir)
    step = int(state.step)
    ema = eqx.nn.inference_mode(state.ema)
    results: dict[str, Any] = {"step": step, "resumed_from": start, "train_seconds": train_seconds}
    results |= {f"train/{k}": v for k, v in _last_logged(run_dir / "metrics.jsonl").items()}
    results |= {f"parameters/{k}": v for k, v in count_parameters(ema).items()}
    results["eval_loss"] = eval_loss(ema) if cached_eval is None else cached_eval["eval_loss"]

    support, real, _ = examples
    generated = generate(ema)
    # The pixels the FID protocol scores: truncated as the reference quantises its samples.
    grid = samples_figure(to_uint8(support), to_uint8(generated))
    if jax.process_index() == 0:  # every process evaluates, one writes
        write_png(run_dir / "samples.png", grid)
    results["samples_png"] = str(run_dir / "samples.png")
    sink.log_images({"samples/grid": grid}, step)

    if config.fid:
        t1 = time.perf_counter()
        fid = _fid(config, ema, unseen, config.eval, sample_config)
        scores = fid_scores(fid, unseen)
        results |= {name: scores[name] for name in FID_METRICS}
        results["fid_detail"] = fid.to_dict()
        results["fid_seconds"] = time.perf_counter() - t1
        sink.log(scores, step)
        sink.log_images(
            {
                f"fid_eval/example_{i}": fid_eval_figure(s, g, r)
                for i, (s, g, r) in enumerate(zip(support, generated, real, strict=True))
            },
            step,
        )
        if config.fid_in_distro:
            fid = _fid(config, ema, seen, config.eval, sample_config)
            scores = fid_scores(fid, seen)
            results |= {f"{name}{seen.tag}": scores[f"{name}{seen.tag}"] for name in FID_METRICS}
            results["fid_in_distro_detail"] = fid.to_dict()
            sink.log(scores, step)
    if config.likelihood:
        scores = _likelihood(config, ema, unseen, config.diffusion)
        results |= scores
        sink.log(scores, step)
    if config.probe:
        scores = probe_views(config, ema, unseen, sink, step)
        results |= scores
        sink.log(scores, step)
    final = {name: results[name] for name, _ in SUMMARY_METRICS if name in results}
    sink.log({f"final/{k}": float(v) for k, v in final.items() if k != "step"}, step)
    return results


def fixed_examples(
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
    drawn = to_float(images[sets.indices])
    return drawn[:, :m], drawn[:, m:]


def fixed_train_sets(
    config: ExperimentConfig, data: Any, split: Any
) -> Float[np.ndarray, "s ns c h w"]:
    """Training sets shown with their target image, chosen once."""
    data_config = dataclasses.replace(
        config.data, batch_size=config.grid_sets, flips=False, prefetch=0, seed=config.eval.seed
    )
    return np.asarray(make_sampler(data_config, data, split).batch(0)[0])


def generate_sets_fn(
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


def eval_loss_fn(
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
