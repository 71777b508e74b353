"""Evaluation of a few-shot run: the inputs fixed for the whole run and the final evaluation.

`evaluate` scores the EMA model at the end of training: its loss on validation classes, the grid
``samples.png``, the few-shot FID protocol and the classification probe on unseen classes; the
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

from ..config import DiffusionConfig
from ..data.pipeline import make_sampler
from ..data.pixels import to_float, to_uint8
from ..instrument import Sink, fid_eval_figure
from ..instrument.figures import samples_figure, write_png
from ..metrics.fewshot import draw_support_sets, fewshot_fid
from ..metrics.probe import fewshot_probe
from ..nn.fsdm import FSDM, count_parameters
from ..train import fsdm_loss_fn
from .config import ExperimentConfig

__all__ = [
    "FID_METRICS",
    "SUMMARY_METRICS",
    "eval_loss_fn",
    "evaluate",
    "fixed_examples",
    "fixed_train_sets",
    "generate_sets_fn",
    "summary_table",
]


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


def summary_table(metrics: dict[str, Any]) -> str:
    """The `SUMMARY_METRICS` present in ``metrics``, one labelled row each, as printed text."""
    rows = [(label, metrics[name]) for name, label in SUMMARY_METRICS if name in metrics]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{label.ljust(width)}  {value:.6g}" for label, value in rows]
    return "\n".join(lines)


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
    # The pixels the FID protocol scores: truncated as the reference quantises its samples.
    grid = samples_figure(to_uint8(support), to_uint8(generated))
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
