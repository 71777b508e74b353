"""Run by the multi-process evaluation test in a fresh interpreter (device flags precede JAX).

``single OUT``: one process, one device. ``worker RANK PORT OUT``: one of two processes of a
`jax.distributed` run, two CPU devices each. Both run generation, the few-shot FID (pixel
features, the reference statistics cached in ``OUT``'s folder and read back on a second call),
the likelihood and the probe on tiny inputs, and save what they got to ``OUT`` (``.npz``).
"""

import os
import sys

if sys.argv[1] == "worker":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import json

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

if sys.argv[1] == "worker":
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2])
    )
    assert jax.process_count() == 2 and jax.local_device_count() == 2

from fsdm_eqx.config import DiffusionConfig, EvalConfig
from fsdm_eqx.metrics.fewshot import fewshot_fid, generate_for_sets
from fsdm_eqx.metrics.likelihood import fewshot_likelihood
from fsdm_eqx.metrics.probe import fewshot_probe
from fsdm_eqx.sharding import make_mesh, replicate

OUT = sys.argv[-1]
# A parameter replicated over every process's devices, as the EMA model of a run is.
SCALE = replicate(jnp.asarray(0.9, jnp.float32), make_mesh())


def generate(support: jax.Array, key: jax.Array) -> jax.Array:
    """3 images near the first ones of the set: depends on the set and its key only."""
    noise = jax.random.uniform(key, support[:3].shape, minval=-0.2, maxval=0.2)
    return jnp.clip(SCALE * support[:3] + noise, -1.0, 1.0)


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1).astype(np.float64) / 255.0


def dataset(n_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_classes), per_class)
    centres = rng.uniform(30, 220, size=(n_classes, 3))[labels][:, :, None, None]
    images = np.clip(np.round(centres + 20 * rng.normal(size=(labels.size, 3, 4, 4))), 0, 255)
    return images.astype(np.uint8), labels


def condition(context: jax.Array):
    """A denoiser that predicts noise from the distance to the context's mean."""
    mu = context.mean(axis=0)

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return (x_t - mu) * SCALE / (1.0 + t.astype(jnp.float32) / 10.0)

    return model_fn


images, labels = dataset(4, 24)
supports = np.random.default_rng(1).uniform(-1, 1, size=(13, 4, 3, 4, 4)).astype(np.float32)
samples = generate_for_sets(generate, supports, samples_per_set=3, seed=5, batch_size=4)
config = EvalConfig(
    num_sets=11,
    ns=4,
    samples_per_set=3,
    generate_batch_size=4,
    kid_subset_size=20,
    kid_num_subsets=4,
    likelihood_sets=7,
    likelihood_steps=5,
    likelihood_batch_size=2,
    seed=2,
)
cache = os.path.join(os.path.dirname(OUT), "reference")
fid = [
    fewshot_fid(
        generate,
        images,
        labels,
        seen_in_training=False,
        config=config,
        features_fn=pixels,
        reference_cache=cache,
    ).to_json()
    for _ in range(2)  # computed and saved, then read back
]
assert fid[0] == fid[1], "the cached reference statistics changed the result"
diffusion = DiffusionConfig(
    num_steps=10, schedule="cosine", variance="fixed_small", loss="mse", sampling_steps=10
)
likelihood = fewshot_likelihood(
    condition, images, labels, diffusion=diffusion, config=config, seen_in_training=False
)
probe = fewshot_probe(
    lambda x: x.mean(axis=(0, 2, 3)),
    images,
    labels,
    ns=3,
    num_episodes=2,
    queries_per_class=5,
    batch_size=3,
)
results = {"fid": json.loads(fid[0]), "likelihood": likelihood.to_dict(), "probe": probe.to_dict()}
np.savez(OUT, samples=samples, results=json.dumps(results, sort_keys=True))
if sys.argv[1] == "worker":
    jax.distributed.shutdown()
