"""The few-shot FID protocol with a cheap stand-in for Inception and generators of known quality."""

import dataclasses
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance

from fsdm_eqx.config import EvalConfig
from fsdm_eqx.data.pixels import to_uint8
from fsdm_eqx.metrics.diversity import mean_pairwise_distance
from fsdm_eqx.metrics.fewshot import (
    distro_label,
    draw_support_sets,
    fewshot_fid,
    generate_for_sets,
)
from fsdm_eqx.metrics.reference_cache import FeatureCache, tree_digest

HALF_LEVEL = (
    0.5 / 127.5
)  # added before truncation, it makes to_uint8 the exact inverse of u8/127.5-1


def _pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1).astype(np.float64) / 255.0


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    colours = np.array([[40, 40, 40], [200, 60, 60], [60, 200, 60], [60, 60, 200]], dtype=float)
    labels = np.repeat(np.arange(4), 60) + 20
    pixels = colours[labels - 20][:, :, None, None] + 25 * rng.normal(size=(240, 3, 4, 4))
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), labels


CONFIG = EvalConfig(
    num_sets=40,
    ns=5,
    samples_per_set=5,
    generate_batch_size=16,
    kid_subset_size=100,
    kid_num_subsets=10,
    sampler="ddim",
    sampling_steps=50,
    seed=3,
)


def copy_support(support, key):
    return support + HALF_LEVEL


def test_support_sets_are_balanced_pure_and_disjoint(dataset):
    _, labels = dataset
    sets = draw_support_sets(labels, [20, 21, 22, 23], num_sets=42, ns=5, seed=1)
    assert sets.indices.shape == (42, 5)
    counts = np.bincount(sets.classes - 20, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 42
    np.testing.assert_array_equal(labels[sets.indices], np.repeat(sets.classes[:, None], 5, 1))
    for c in range(20, 24):  # at most 11 sets * 5 = 55 <= 60 images: no image is reused
        used = sets.indices[sets.classes == c].ravel()
        assert np.unique(used).size == used.size
    again = draw_support_sets(labels, [20, 21, 22, 23], num_sets=42, ns=5, seed=1)
    np.testing.assert_array_equal(again.indices, sets.indices)


def test_support_sets_reuse_a_class_only_when_it_runs_out(dataset):
    _, labels = dataset
    sets = draw_support_sets(labels, [20], num_sets=30, ns=5, seed=0)  # 150 draws from 60
    for row in sets.indices:
        assert np.unique(row).size == 5
    first_pass = sets.indices[:12].ravel()
    assert np.unique(first_pass).size == 60
    with pytest.raises(ValueError, match="fewer than ns=80"):
        draw_support_sets(labels, [20], num_sets=1, ns=80, seed=0)


def test_generation_keys_do_not_depend_on_the_batch_size():
    supports = np.zeros((7, 5, 1, 2, 2), dtype=np.float32)

    def noisy(support, key):
        return support[:3] + jax.random.normal(key, (3, 1, 2, 2))

    a = generate_for_sets(noisy, supports, samples_per_set=3, seed=0, batch_size=3)
    b = generate_for_sets(noisy, supports, samples_per_set=3, seed=0, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.unique(a[:, 0, 0, 0, 0]).size == 7  # one key per set
    with pytest.raises(ValueError, match="samples_per_set"):
        generate_for_sets(noisy, supports, samples_per_set=5, seed=0, batch_size=4)


def test_a_generator_that_copies_its_support_scores_perfectly(dataset):
    images, labels = dataset
    result = fewshot_fid(
        copy_support, images, labels, seen_in_training=False, config=CONFIG, features_fn=_pixels
    )
    assert abs(result.fid) < 1e-8
    assert abs(result.kid_mean) < 2 * result.kid_std  # consistent with zero
    assert (result.precision, result.recall) == (1.0, 1.0)
    assert set(result.fid_per_class) == {20, 21, 22, 23}
    assert max(abs(v) for v in result.fid_per_class.values()) < 1e-8
    assert result.num_generated == result.num_real == 200
    record = json.loads(result.to_json())
    assert record["sampler"] == "ddim" and record["sampling_steps"] == 50 and record["seed"] == 3
    assert record["distro"] == "out-distro" and record["features"] == "_pixels"
    assert record["num_sets"] == 40 and record["ns"] == 5 and record["samples_per_set"] == 5


def test_figures_degrade_with_the_generator(dataset):
    images, labels = dataset
    results = []
    for sigma in (0.05, 0.6):

        def noisy(support, key, sigma=sigma):
            return support + HALF_LEVEL + sigma * jax.random.normal(key, support.shape)

        results.append(
            fewshot_fid(
                noisy, images, labels, seen_in_training=False, config=CONFIG, features_fn=_pixels
            )
        )
    good, bad = results
    assert 0 < good.fid < bad.fid
    assert good.kid_mean < bad.kid_mean
    assert good.precision > bad.precision
    assert all(good.fid_per_class[c] < bad.fid_per_class[c] for c in good.classes)


def test_class_blind_generator_is_caught_per_class(dataset):
    images, labels = dataset
    grey = to_uint8(np.zeros(1)) * 0 + 40  # the colour of class 20

    def always_class_20(support, key):
        noise = 25 / 127.5 * jax.random.normal(key, support.shape)
        return jnp.full(support.shape, float(grey[0]) / 127.5 - 1.0) + noise

    result = fewshot_fid(
        always_class_20, images, labels, seen_in_training=True, config=CONFIG, features_fn=_pixels
    )
    others = [result.fid_per_class[c] for c in (21, 22, 23)]
    assert result.fid_per_class[20] < 0.1 * min(others)
    assert result.distro == "in-distro"


def test_the_label_says_whether_the_classes_were_seen_in_training(dataset):
    """Training classes are labelled in-distribution, unseen ones out-of-distribution; there is
    no default that could mislabel one as the other."""
    images, labels = dataset
    seen = fewshot_fid(
        copy_support, images, labels, seen_in_training=True, config=CONFIG, features_fn=_pixels
    )
    assert seen.distro == "in-distro" and json.loads(seen.to_json())["distro"] == "in-distro"
    unseen = fewshot_fid(
        copy_support, images, labels, seen_in_training=False, config=CONFIG, features_fn=_pixels
    )
    assert unseen.distro == "out-distro"
    with pytest.raises(TypeError, match="seen_in_training"):
        fewshot_fid(copy_support, images, labels, config=CONFIG, features_fn=_pixels)
    assert distro_label(True) == "in-distro" and distro_label(False) == "out-distro"
    with pytest.raises(TypeError, match="seen_in_training"):
        distro_label("train")


def test_bad_input_is_explained(dataset):
    images, labels = dataset
    big_sets = EvalConfig(num_sets=4, ns=61)
    with pytest.raises(ValueError, match="fewer than ns=61; lower ns"):
        fewshot_fid(
            copy_support,
            images,
            labels,
            seen_in_training=False,
            config=big_sets,
            features_fn=_pixels,
        )
    with pytest.raises(ValueError, match="no classes"):
        fewshot_fid(
            copy_support,
            images,
            labels,
            seen_in_training=False,
            config=CONFIG,
            features_fn=_pixels,
            classes=[],
        )


@pytest.mark.slow
def test_default_features_are_the_fid_inception():
    import warnings

    from fsdm_eqx.metrics import frechet_distance, inception_features, load_inception
    from tests.conftest import shared_path

    weights = shared_path("weights", "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 3, 32, 32), dtype=np.uint8)
    labels = np.repeat([0, 1], 6)
    config = EvalConfig(num_sets=2, ns=3, samples_per_set=3, inception_weights=weights, seed=1)

    def darker(support, key):
        return support * 0.5 + HALF_LEVEL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 6 images: singular covariances
        result = fewshot_fid(darker, images, labels, seen_in_training=False, config=config)
        model = load_inception(weights)
        sets = draw_support_sets(labels, [0, 1], num_sets=2, ns=3, seed=1)
        real = images[sets.indices].reshape(-1, 3, 32, 32)
        fake = to_uint8(darker(real.astype(np.float32) / 127.5 - 1.0, None))
        f_real = inception_features(model, real).astype(np.float64)
        f_fake = inception_features(model, fake).astype(np.float64)
        stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f_fake, f_real)]
        expected = frechet_distance(*stats[0], *stats[1])
    assert "inception" in result.features
    np.testing.assert_allclose(result.fid, expected, rtol=1e-6)


_SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import equinox as eqx
import jax
import numpy as np
from fsdm_eqx.metrics.fewshot import generate_for_sets

def noisy(support, key):
    return support[:2] + jax.random.normal(key, (2, *support.shape[1:]))

supports = np.random.default_rng(0).normal(size=(10, 3, 1, 2, 2)).astype(np.float32)
assert len(jax.local_devices()) == 4
many = generate_for_sets(noisy, supports, samples_per_set=2, seed=5, batch_size=3)
one = generate_for_sets(
    noisy, supports, samples_per_set=2, seed=5, batch_size=3, devices=jax.devices()[:1]
)
print(float(np.max(np.abs(many - one))))
"""


def test_generation_split_over_devices_gives_the_same_samples():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=300, check=True
    )
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-6


@pytest.mark.slow
def test_the_fsdm_model_plugs_into_every_protocol(getkey):
    from fsdm_eqx.config import DiffusionConfig, model_preset
    from fsdm_eqx.metrics import fewshot_likelihood, fewshot_probe
    from fsdm_eqx.nn import FSDM

    model = FSDM(model_preset("smoke"), key=getkey())
    diffusion = DiffusionConfig(num_steps=10, sampling_steps=3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 3, 32, 32), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], 20)
    config = EvalConfig(
        num_sets=6,
        ns=4,
        samples_per_set=2,
        generate_batch_size=4,
        kid_subset_size=10,
        kid_num_subsets=2,
        pr_neighbours=2,
        likelihood_sets=3,
        likelihood_steps=4,
        likelihood_batch_size=2,
        sampling_steps=3,
    )

    def generate(support, key):
        return model.sample(support, 2, key=key, diffusion_config=diffusion)

    def condition(context_set):
        c = model.context(context_set, inference=True).c
        return lambda x_t, t: model.denoiser(x_t, t, c, inference=True)

    def embed(x_set):
        return model.context(x_set, inference=True).c

    fid = fewshot_fid(
        generate, images, labels, seen_in_training=False, config=config, features_fn=_pixels
    )
    bpd = fewshot_likelihood(
        condition, images, labels, diffusion=diffusion, config=config, seen_in_training=False
    )
    probe = fewshot_probe(embed, images, labels, ns=4, num_episodes=1, queries_per_class=3)
    assert np.isfinite(fid.fid) and fid.num_generated == 12 and fid.num_real == 24
    assert np.isfinite(bpd.bpd) and bpd.bpd > 0 and bpd.num_images == 12
    assert probe.num_queries == 9 and probe.confusion.sum() == 9


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("ns", 1, r"EvalConfig.ns=1 is not allowed; it must lie in \[2, inf\]"),
        ("likelihood_steps", 0, "EvalConfig.likelihood_steps=0 is not allowed"),
        ("kid_subset_size", 1, "EvalConfig.kid_subset_size=1 is not allowed"),
        ("seed", -1, "EvalConfig.seed=-1 is not allowed"),
        ("num_sets", 0, "EvalConfig.num_sets=0 is not allowed"),
    ],
)
def test_eval_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**{field: value})


def test_diversity_is_the_mean_pairwise_distance_within_each_set(dataset):
    images, labels = dataset

    def noisy(support, key):
        return support + HALF_LEVEL + 0.3 * jax.random.normal(key, support.shape)

    result = fewshot_fid(
        noisy, images, labels, seen_in_training=False, config=CONFIG, features_fn=_pixels
    )
    sets = draw_support_sets(labels, (20, 21, 22, 23), num_sets=40, ns=5, seed=3)
    real = _pixels(images[sets.indices].reshape(-1, 3, 4, 4)).reshape(40, 5, -1)
    expected_real = np.mean([scipy.spatial.distance.pdist(group).mean() for group in real])
    assert result.diversity_real == pytest.approx(expected_real, rel=1e-9)
    assert result.diversity > 0
    # Copying the support set reproduces its diversity; repeating one image has none.
    copied = fewshot_fid(
        copy_support, images, labels, seen_in_training=False, config=CONFIG, features_fn=_pixels
    )
    assert copied.diversity == pytest.approx(copied.diversity_real, rel=1e-9)

    def repeat_first(support, key):
        return jnp.broadcast_to(support[:1], support.shape) + HALF_LEVEL

    repeated = fewshot_fid(
        repeat_first, images, labels, seen_in_training=False, config=CONFIG, features_fn=_pixels
    )
    assert repeated.diversity == pytest.approx(0.0, abs=1e-6)


def test_mean_pairwise_distance_matches_scipy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 4, 9))
    expected = np.mean([scipy.spatial.distance.pdist(group).mean() for group in features])
    assert mean_pairwise_distance(features) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="two members"):
        mean_pairwise_distance(features[:, :1])


def test_reference_statistics_are_extracted_once_and_reused(dataset, tmp_path):
    images, labels = dataset
    extracted = []

    def counting_pixels(batch):
        extracted.append(batch.copy())
        return _pixels(batch)

    def run(config=CONFIG):
        extracted.clear()
        result = fewshot_fid(
            copy_support,
            images,
            labels,
            seen_in_training=False,
            config=config,
            features_fn=counting_pixels,
            reference_cache=tmp_path,
            reference_tag="toy-test",
        )
        return result, sum(batch.shape[0] for batch in extracted)

    first, count = run()
    assert count == 400  # 200 real and 200 generated images
    (cached,) = tmp_path.glob("toy-test-200-*.npz")
    second, count = run()
    assert count == 200  # only the generated images: the real ones come from the cache
    assert second.fid == first.fid and second.kid_mean == first.kid_mean
    # Other sets (another seed) are other real images: a new file, extracted again.
    _, count = run(dataclasses.replace(CONFIG, seed=4))
    assert count == 400 and len(list(tmp_path.glob("toy-test-200-*.npz"))) == 2
    # A damaged file is recomputed rather than trusted.
    cached.write_bytes(b"not an npz")
    third, count = run()
    assert count == 400 and third.fid == first.fid


def test_the_reference_cache_key_follows_pixels_and_extractor():
    images = np.zeros((4, 3, 2, 2), np.uint8)
    cache = FeatureCache(pathlib.Path("/nonexistent"), "extractor-a", "t")
    changed = images.copy()
    changed[0, 0, 0, 0] = 1
    assert cache.path_for(images) != cache.path_for(changed)
    other = FeatureCache(pathlib.Path("/nonexistent"), "extractor-b", "t")
    assert cache.path_for(images) != other.path_for(images)
    assert cache.path_for(images) == cache.path_for(images.copy())
    assert tree_digest({"w": np.ones(3)}) != tree_digest({"w": np.ones(3) * 2})


class _Shifted(eqx.Module):
    """A generator holding weights, as the FSDM model does; ``traces`` counts compilations."""

    shift: jax.Array
    traces: list = eqx.field(static=True)

    def __call__(self, support, key):
        self.traces.append(1)  # runs only while tracing
        return support + HALF_LEVEL + self.shift


def test_a_pytree_generator_compiles_once_for_new_weights(dataset):
    images, labels = dataset
    traces: list = []
    results = [
        fewshot_fid(
            _Shifted(jnp.asarray(shift), traces),
            images,
            labels,
            seen_in_training=False,
            config=CONFIG,
            features_fn=_pixels,
        )
        for shift in (0.0, 0.5)
    ]
    assert len(traces) == 1  # the second evaluation, with other weights, reuses the compilation
    assert results[0].fid < 1e-8 < results[1].fid  # ... and sees its own weights
