"""The few-shot experiment: train FSDM on training classes, evaluate on unseen classes.

`run_experiment` loads the data, builds the model, trains (resuming from the run directory when it
holds a checkpoint), evaluates the EMA model and writes ``config.json``, ``metrics.json``,
``metrics.jsonl`` and ``samples.png`` under the run directory.
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
from ..metrics._inception_weights import InceptionWeightsError
from ..nn.fsdm import FSDM
from ..train import (
    fsdm_loss_fn,
    init_train_state,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
    train,
)
from ..train.checkpoint import read_checkpoint_metadata, resumable_checkpoint
from .config import ExperimentConfig
from .evaluate import (
    eval_loss_fn,
    evaluate,
    fixed_examples,
    fixed_train_sets,
    generate_sets_fn,
    summary_table,
)

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
    support, real = fixed_examples(config, eval_images, eval_labels, eval_classes)
    train_sets = fixed_train_sets(config, data, split)
    sample_config = dataclasses.replace(
        config.diffusion,
        sampler=config.eval.sampler,
        sampling_steps=min(config.eval.sampling_steps, config.diffusion.num_steps),
    )
    generate_sets = generate_sets_fn(config.eval.samples_per_set, sample_config)
    image_keys = jax.random.split(jax.random.PRNGKey(config.eval.seed), config.grid_sets)
    eval_loss = eval_loss_fn(config, data, split, eval_key)
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
        results = evaluate(
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
    print(summary_table(results), flush=True)
    return results
