"""CPU demonstration: few-shot generation of handwritten characters from alphabets never seen.

Trains an FSDM (set ViT + DiT, classifier-free guidance on the context) for a wall-clock budget
on the Omniglot characters of every alphabet but the test ones, then, for each character of the
test alphabets, generates images from a support set of 5 of its drawings and measures, in pixel
space (independent of the model):

- `accuracy`: the fraction of generated images whose nearest class mean, over the held-out
  drawings of all test characters, is their support's character (chance: one over the test
  characters); beside it the same figure for the support drawings themselves (real images, the
  ceiling of this classifier), for the null context (unconditional samples) and for support sets
  shuffled between characters;
- `support_distance`: the median distance from a generated image to the nearest image of its
  support set, beside the same median for held-out real drawings (copies would sit far below);
- `kid_pixels`: the kernel distance of pixel features (KID's estimator, its mean over
  subsets) to the held-out drawings.

Every guidance scale of `--guidance-scales` is evaluated. The run writes `metrics.json`,
`samples.png` (support rows over generated rows) and the model checkpoint to `--out-dir`.

    python experiments/cpu_demo.py --data-dir ../shared/data/omniglot --minutes 30
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from PIL import Image

from fsdm_eqx.config import DiffusionConfig, ModelConfig, OptimConfig, ScheduleName
from fsdm_eqx.data.omniglot import load_omniglot
from fsdm_eqx.data.pixels import to_float
from fsdm_eqx.data.sets import SetSampler
from fsdm_eqx.instrument.figures import tile_rows, to_rgb
from fsdm_eqx.metrics import kid
from fsdm_eqx.metrics.transfer import nearest_class_accuracy, support_distances
from fsdm_eqx.nn import FSDM, count_parameters
from fsdm_eqx.train import fsdm_loss_fn, init_train_state, make_train_step, save_checkpoint


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The CPU demonstration's settings."""

    data_dir: str | None = None
    """Folder holding Omniglot's `images_background_small1.zip` and `..._small2.zip` (downloaded
    into the cache when None)."""
    out_dir: str = "runs/cpu-demo"
    """Where metrics, figure and checkpoint go."""
    minutes: float = 30.0
    """Training budget in wall-clock minutes (compilation included)."""
    test_alphabets: tuple[str, ...] = ("Early_Aramaic", "Tagalog")
    """Alphabets held out of training: their characters are the unseen classes."""
    batch_size: int = 8
    """Sets of 6 drawings per step."""
    dit_hidden: int = 128
    """Width of the DiT (and twice the width of the set ViT's context)."""
    dit_depth: int = 6
    """Blocks of the DiT."""
    lr: float = 2e-3
    """AdamW learning rate (after 200 warm-up steps)."""
    schedule: ScheduleName = "cosine"
    """Noise schedule of the 1000-step diffusion (cosine suits small images)."""
    shots: int = 5
    """Support drawings per test character."""
    samples: int = 5
    """Images generated per test character and guidance scale."""
    sampling_steps: int = 50
    """DDIM steps."""
    guidance_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    """Classifier-free guidance scales evaluated."""
    seed: int = 0
    """Seed of initialisation, batches and sampling."""


def model_config(config: DemoConfig) -> ModelConfig:
    """A set ViT (patch 7, two blocks) and a DiT with 4x4 patches on 28x28 drawings, with a
    null context for classifier-free guidance."""
    return ModelConfig(
        encoder="vit",
        pooling="mean",
        hdim=config.dit_hidden,
        encoder_depth=2,
        encoder_heads=4,
        encoder_head_dim=32,
        encoder_mlp_dim=2 * config.dit_hidden,
        encoder_patch_size=7,
        variational=False,
        denoiser="dit",
        dit_size=None,
        dit_hidden=config.dit_hidden,
        dit_depth=config.dit_depth,
        dit_heads=config.dit_hidden // 32,
        dit_patch_size=4,
        image_size=28,
        channels=1,
        ns=6,
        learned_variance=False,
        null_context_prob=0.1,
    )


def _omniglot(config: DemoConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 242 distinct characters of the two small background subsets, uint8 (n, 1, 28, 28)."""
    data = load_omniglot(
        ("background_small1", "background_small2"), image_size=28, data_dir=config.data_dir
    )
    keep_class: dict[str, int] = {}
    for index, name in enumerate(data.class_names):
        keep_class.setdefault(name.split("/", 1)[1], index)  # Greek and Latin appear twice
    kept = sorted(keep_class.items(), key=lambda item: item[1])
    new_label = {old: new for new, (_, old) in enumerate(kept)}
    mask = np.isin(data.labels, list(new_label))
    labels = np.asarray([new_label[int(c)] for c in data.labels[mask]])
    return data.images[mask], labels, [name for name, _ in kept]


def train(config: DemoConfig, images: np.ndarray, labels: np.ndarray, classes: np.ndarray):
    """Train for the time budget; returns the EMA model and the number of steps."""
    diffusion_config = DiffusionConfig(schedule=config.schedule, variance="fixed_small", loss="mse")
    optim = OptimConfig(
        lr=config.lr, warmup_steps=200, ema_decay=0.999, ema_start=500, ema_every=1, grad_clip=1.0
    )
    model_cfg = model_config(config)
    model = FSDM(model_cfg, key=jax.random.key(config.seed))
    print("parameters", count_parameters(model), flush=True)
    step_fn = make_train_step(fsdm_loss_fn(diffusion_config), optim, total_steps=10**6)
    state = init_train_state(model, optim, key=jax.random.key(config.seed + 1), total_steps=10**6)
    sampler = SetSampler(
        images, labels, classes.tolist(), ns=model_cfg.ns, batch_size=config.batch_size,
        seed=config.seed, flips=False, prefetch=2,
    )  # fmt: skip
    start, step, losses = time.perf_counter(), 0, []
    with sampler.stream() as stream:
        for sets, _ in stream:
            state, metrics = step_fn(state, jnp.asarray(sets))
            step += 1
            if step % 100 == 0:
                losses.append(float(metrics["loss"]))
                elapsed = time.perf_counter() - start
                print(f"step {step} loss {losses[-1]:.4f} {elapsed / 60:.1f} min", flush=True)
            if time.perf_counter() - start > 60 * config.minutes:
                break
    return state, step, time.perf_counter() - start, losses


def evaluate(config: DemoConfig, model: FSDM, images: np.ndarray, labels: np.ndarray,
             classes: np.ndarray) -> tuple[dict[str, object], dict[str, np.ndarray]]:  # fmt: skip
    """Generate from one support set per test class and measure the transfer figures."""
    rng = np.random.default_rng(config.seed)
    supports, heldout, heldout_labels = [], [], []
    for c in classes:
        index = rng.permutation(np.flatnonzero(labels == c))
        supports.append(to_float(images[index[: config.shots]]))
        heldout.append(to_float(images[index[config.shots :]]))
        heldout_labels.append(np.full(len(index) - config.shots, c))
    support = np.stack(supports)
    real, real_labels = np.concatenate(heldout), np.concatenate(heldout_labels)
    sample_config = DiffusionConfig(
        schedule=config.schedule,
        variance="fixed_small",
        loss="mse",
        sampler="ddim",
        sampling_steps=config.sampling_steps,
    )

    @eqx.filter_jit
    def generate(model: FSDM, support: jax.Array, key: jax.Array, w: float) -> jax.Array:
        def one(s: jax.Array, k: jax.Array) -> jax.Array:
            return model.sample(
                s, config.samples, key=k, diffusion_config=sample_config, guidance_scale=w
            )

        return jax.vmap(one)(support, jax.random.split(key, support.shape[0]))

    key = jax.random.key(config.seed + 2)
    gen_labels = np.repeat(classes, config.samples)
    shuffled = np.roll(np.arange(len(classes)), 1)  # every set gets another character's support
    results: dict[str, object] = {
        "test_classes": len(classes),
        "chance": 1.0 / len(classes),
        "support_accuracy": nearest_class_accuracy(
            support.reshape(-1, *support.shape[2:]),
            np.repeat(classes, config.shots),
            real,
            real_labels,
        ),
        "real_support_distance_median": float(
            np.median(support_distances(real, support[np.searchsorted(classes, real_labels)]))
        ),
    }
    generated: dict[str, np.ndarray] = {}
    runs = [(f"w={w:g}", support, w) for w in config.guidance_scales]
    runs += [("null_context", support, 0.0), ("shuffled_supports", support[shuffled], 1.0)]
    for name, sets, w in runs:
        t0 = time.perf_counter()
        images_out = np.asarray(generate(model, jnp.asarray(sets), key, w))
        flat = images_out.reshape(-1, *images_out.shape[2:])
        figures = {
            "accuracy": nearest_class_accuracy(flat, gen_labels, real, real_labels),
            "support_distance_median": float(
                np.median(support_distances(flat, np.repeat(support, config.samples, axis=0)))
            ),
            "kid_pixels": kid(
                real.reshape(len(real), -1),
                flat.reshape(len(flat), -1),
                subset_size=100,
                num_subsets=50,
            ).mean,
            "seconds": time.perf_counter() - t0,
        }
        print(name, figures, flush=True)
        results[name] = figures
        generated[name] = images_out
    return results, {"support": support, **generated}


def figure(images: dict[str, np.ndarray], w: str, num_classes: int = 8) -> np.ndarray:
    """Support rows (blue frame) over the images generated from them (no frame)."""
    rows = []
    for c in range(min(num_classes, len(images["support"]))):
        rows.append([(t, (60, 90, 200)) for t in to_rgb(images["support"][c])])
        rows.append([(t, None) for t in to_rgb(images[w][c])])
    return tile_rows(rows)


def main(config: DemoConfig) -> None:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, names = _omniglot(config)
    alphabet = np.asarray([n.split("/")[0] for n in names])
    unknown = set(config.test_alphabets) - set(alphabet.tolist())
    if unknown:
        raise SystemExit(
            f"unknown test alphabets {sorted(unknown)}; choose among {sorted(set(alphabet))}."
        )
    test = np.flatnonzero(np.isin(alphabet, config.test_alphabets))
    train_classes = np.flatnonzero(~np.isin(alphabet, config.test_alphabets))
    print(
        f"{len(train_classes)} training characters, {len(test)} unseen test characters", flush=True
    )
    state, steps, seconds, losses = train(config, images, labels, train_classes)
    model = dataclasses.asdict(model_config(config))
    save_checkpoint(out, state, metadata={"model": model, "steps": steps})
    results, generated = evaluate(config, state.ema, images, labels, test)
    results |= {
        "steps": steps, "train_minutes": seconds / 60, "images_per_s": steps * config.batch_size
        * 6 / seconds, "losses_every_100": losses, "config": dataclasses.asdict(config),
        "train_alphabets": sorted(set(alphabet[train_classes].tolist())),
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    best = max(
        (f"w={w:g}" for w in config.guidance_scales),
        key=lambda k: results[k]["accuracy"],  # type: ignore[index]
    )
    Image.fromarray(figure(generated, best)).save(out / "samples.png")
    np.savez_compressed(out / "generated.npz", **generated)
    print(json.dumps({k: v for k, v in results.items() if k != "losses_every_100"}, indent=2))


if __name__ == "__main__":
    main(tyro.cli(DemoConfig))
