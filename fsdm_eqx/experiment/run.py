"""The few-shot experiment: train FSDM on training classes, evaluate on unseen classes.

`run_experiment` loads the data, builds the model, trains (resuming from the run directory when it
holds a checkpoint), evaluates the EMA model and writes ``config.json``, ``metrics.json``,
``metrics.jsonl`` and ``samples.png`` under the run directory. In a multi-process run every
process trains and evaluates, and process 0 alone writes these files and prints.
"""

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..data.pipeline import load_dataset, make_sampler
from ..instrument import (
    Visuals,
    collect_visuals,
    generation_figure,
    make_sink,
    support_target_figure,
)
from ..instrument.histograms import path_histograms
from ..metrics._inception_weights import InceptionWeightsError
from ..nn.fsdm import FSDM
from ..train import (
    fsdm_loss_fn,
    init_train_state,
    make_mesh,
    make_train_step,
    make_update_probe,
    replicate,
    shard_batch,
    train,
)
from ..train.checkpoint import (
    BEST_DIR,
    read_checkpoint_metadata,
    restore_checkpoint,
    resumable_checkpoint,
)
from .config import ExperimentConfig, curve_every
from .evaluate import (
    EvalData,
    eval_loss_fn,
    evaluate,
    fid_curve_fn,
    fixed_examples,
    fixed_train_sets,
    generate_sets_fn,
    probe_views,
    summary_table,
)
from .resume import check_resume_compatible

__all__ = ["run_experiment"]


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
    # The checkpoint `train` resumes from: the newest intact one (damaged ones are named), which
    # must have been trained with this model and data; checked before config.json is rewritten.
    last = resumable_checkpoint(run_dir)
    stored = {} if last is None else read_checkpoint_metadata(last)
    start = int(stored.get("step", 0))
    check_resume_compatible(stored.get("experiment", {}), config, anyway=config.run.resume_anyway)
    data, split = load_dataset(config.data)
    metadata = {"experiment": dataclasses.asdict(config), "class_split": split.to_dict()}
    # Every process trains and evaluates (both are collective); process 0 alone writes and prints.
    lead = jax.process_index() == 0
    if lead:
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

    unseen = _eval_data(data, split.classes(config.eval.eval_split), config.eval.eval_split)
    seen = _eval_data(data, split.classes("train"), "train")
    support, real = fixed_examples(config, unseen.images, unseen.labels, unseen.classes)
    train_sets = fixed_train_sets(config, data, split)
    sample_config = dataclasses.replace(
        config.diffusion,
        sampler=config.eval.sampler,
        sampling_steps=min(config.eval.sampling_steps, config.diffusion.num_steps),
    )
    generate_sets = generate_sets_fn(config.eval.samples_per_set, sample_config)
    image_keys = jax.random.split(jax.random.PRNGKey(config.eval.seed), config.grid_sets)
    eval_loss = eval_loss_fn(config, data, split, eval_key)
    fid_every = curve_every(config)
    fid_curve = fid_curve_fn(config, unseen, config.diffusion) if fid_every else None
    evaluated: dict[int, dict[str, float]] = {}

    def eval_fn(state: Any) -> dict[str, float]:
        ema = eqx.nn.inference_mode(state.ema)
        step = int(state.step)
        results = {"eval_loss": eval_loss(ema)}
        if fid_curve is not None and step % fid_every == 0:
            results |= fid_curve(ema)
        if config.probe:
            results |= probe_views(config, ema, unseen, sink, step)
        evaluated[step] = results
        return results

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

    update_probe = make_update_probe(loss_fn, config.optim, mesh=mesh)
    # The histograms' batch: the run's first, drawn once and kept on the devices.
    probe_batch = shard_batch(sampler.batch(0)[0], mesh) if config.histogram_paths else None

    def visuals_fn(state: Any) -> Visuals:
        visuals = Visuals({}, {}, {})
        if config.visual_sets:
            visuals = collect_visuals(
                eqx.nn.inference_mode(state.ema),
                jnp.asarray(support[: config.visual_sets]),
                layers=sorted({0, config.model.encoder_depth - 1}),
                heads=(0,),
                key=jax.random.PRNGKey(config.eval.seed),
            )
        if probe_batch is not None:
            # The gradient and update the step would apply on the run's first batch.
            grads, updates = update_probe(state, probe_batch)
            for name, tree in (("grads", grads), ("updates", updates)):
                visuals.histograms.update(
                    path_histograms(tree, name, max_paths=config.histogram_paths)
                )
        return visuals

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
            visuals_fn=visuals_fn if config.visual_sets or config.histogram_paths else None,
            monitor="fid" if fid_every else "eval_loss",
        )
        train_seconds = time.perf_counter() - t0
        last_step = int(state.step)
        if config.final_checkpoint == "best":
            state = _best_state(run_dir, state)
        state_is_last = int(state.step) == last_step
        results = evaluate(
            config,
            state,
            start=start,
            train_seconds=train_seconds,
            cached_eval=evaluated.get(int(state.step)) if state_is_last else None,
            eval_loss=eval_loss,
            examples=(support, real, train_sets),
            generate=lambda ema: np.asarray(generate_sets(ema, jnp.asarray(support), image_keys)),
            unseen=unseen,
            seen=seen,
            sample_config=sample_config,
            sink=sink,
        )
    finally:
        sink.close()
    if lead:
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        print(summary_table(results), flush=True)
    return results


def _eval_data(data: Any, classes: Any, part: str) -> EvalData:
    """The images of ``classes`` of the dataset, as the evaluations take them."""
    mask = np.isin(data.labels, classes)
    return EvalData(
        images=data.images[mask],
        labels=data.labels[mask],
        classes=tuple(int(c) for c in classes),
        class_names=data.class_names,
        seen_in_training=part == "train",
    )


def _best_state(run_dir: Path, state: Any) -> Any:
    """The training state of the best evaluation (``run_dir/best/``), or ``state`` when the run
    kept none."""
    best = resumable_checkpoint(run_dir / BEST_DIR)
    lead = jax.process_index() == 0
    if best is None:
        if lead:
            print(f"No best checkpoint in {run_dir / BEST_DIR}; evaluating the last one.")
        return state
    restored, _ = restore_checkpoint(best, state)
    if lead:
        print(f"Evaluating the best checkpoint, {best}.")
    return restored
