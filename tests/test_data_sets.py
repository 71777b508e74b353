"""The set sampler: shapes, set membership, determinism and resumption, multi-host streams,
flips, the prefetch thread, and the evaluation enumeration."""

import threading

import numpy as np
import pytest
import scipy.stats

from fsdm_eqx.config import DataConfig
from fsdm_eqx.data import (
    LabelledImages,
    SetSampler,
    evaluation_sets,
    load_dataset,
    make_sampler,
)
from fsdm_eqx.data.sets import THREAD_PREFIX
from tests.conftest import shared_path

CLASS_SIZES = (7, 12, 9, 5, 30, 6)  # unequal on purpose


@pytest.fixture(scope="module")
def data() -> LabelledImages:
    """Random images, the classes interleaved so that indices and labels do not align."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES))
    images = rng.integers(0, 256, (labels.size, 3, 4, 5), dtype=np.uint8)
    return LabelledImages(images, labels.astype(np.int64), tuple("abcdef"))


def _sampler(data: LabelledImages, **kw: object) -> SetSampler:
    args: dict[str, object] = dict(ns=5, batch_size=16, seed=1, prefetch=0, classes=[0, 1, 2, 4])
    args.update(kw)
    classes = args.pop("classes")
    return SetSampler(data.images, data.labels, classes, **args)  # type: ignore[arg-type]


def _reference_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 127.5 - 1.0


def test_batch_shape_range_and_membership(data: LabelledImages) -> None:
    sampler = _sampler(data)
    sets, labels = sampler.batch(0)
    assert sets.shape == (16, 5, 3, 4, 5) and sets.dtype == np.float32
    assert labels.shape == (16,) and labels.dtype == np.int64
    assert sets.min() >= -1.0 and sets.max() <= 1.0
    index, _ = sampler.indices(0)
    for j in range(16):
        assert labels[j] in (0, 1, 2, 4)
        # Every image of a set has the set's label, and no image appears twice in a set.
        np.testing.assert_array_equal(data.labels[index[j]], labels[j])
        assert len(set(index[j].tolist())) == 5
        np.testing.assert_allclose(sets[j], _reference_float(data.images[index[j]]), atol=1e-6)


def test_every_pixel_value_maps_linearly_onto_minus_one_one() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
    sampler = SetSampler(images, np.zeros(256, np.int64), [0], ns=256, batch_size=1, prefetch=0)
    sets, _ = sampler.batch(0)
    index, _ = sampler.indices(0)
    got = sets.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(got, index[0] / 127.5 - 1.0, rtol=0, atol=1.2e-7)
    assert got.min() == -1.0 and got.max() == 1.0


def test_deterministic_given_seed_and_step(data: LabelledImages) -> None:
    a, b = _sampler(data), _sampler(data)
    for step in (0, 3, 1000):
        np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0])
    assert not np.array_equal(a.batch(0)[0], _sampler(data, seed=2).batch(0)[0])


def test_resumed_stream_equals_uninterrupted(data: LabelledImages) -> None:
    sampler = _sampler(data, prefetch=3)
    with sampler.stream(0, 8) as stream:
        full = list(stream)
    assert len(full) == 8
    with sampler.stream(5, 3) as stream:
        resumed = list(stream)
    for x, y in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    synchronous = list(_sampler(data, prefetch=0).stream(0, 8))
    for x, y in zip(full, synchronous, strict=True):
        np.testing.assert_array_equal(x[0], y[0])


def test_hosts_draw_disjoint_slices_of_one_global_batch(data: LabelledImages) -> None:
    single = _sampler(data, batch_size=12)
    hosts = [_sampler(data, batch_size=3, host_index=h, host_count=4) for h in range(4)]
    for step in (0, 7):
        parts = [h.indices(step)[0] for h in hosts]
        np.testing.assert_array_equal(np.concatenate(parts), single.indices(step)[0])
        np.testing.assert_array_equal(
            np.concatenate([h.batch(step)[0] for h in hosts]), single.batch(step)[0]
        )
        # Disjoint streams: no set is drawn by two hosts.
        keys = [tuple(map(tuple, p)) for p in parts]
        assert sum(len(k) for k in keys) == len(set().union(*keys))


def test_class_and_image_frequencies_are_uniform(data: LabelledImages) -> None:
    sampler = _sampler(data, batch_size=64)
    index = np.concatenate([sampler.indices(s)[0] for s in range(40)])  # 2560 sets
    classes = data.labels[index[:, 0]]
    counts = np.array([np.sum(classes == c) for c in (0, 1, 2, 4)])
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    # Within a class every image is equally likely, both for a large class (30 images: drawn by
    # rejection) and a small one (12 images: drawn from a random ordering).
    for c in (4, 1):
        members = index[classes == c].ravel()
        per_image = np.bincount(members, minlength=len(data))[data.labels == c]
        assert scipy.stats.chisquare(per_image).pvalue > 1e-3


def test_flips_act_on_whole_sets(data: LabelledImages) -> None:
    plain, flipped = _sampler(data, batch_size=64), _sampler(data, batch_size=64, flips=True)
    np.testing.assert_array_equal(plain.indices(2)[0], flipped.indices(2)[0])
    x, y = plain.batch(2)[0], flipped.batch(2)[0]
    seen = set()
    for j in range(64):
        for h in (False, True):
            for v in (False, True):
                candidate = x[j][..., ::-1] if h else x[j]
                candidate = candidate[..., ::-1, :] if v else candidate
                if np.array_equal(candidate, y[j]):
                    seen.add((h, v))
                    break
            else:
                continue
            break
        else:
            pytest.fail(f"set {j} is not a flip of the unflipped set")
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
    _, flags = flipped.indices(2)
    assert 0.25 < flags.mean() < 0.75


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.mark.parametrize("workers", [1, 3])
def test_prefetch_threads_keep_order_and_stop(data: LabelledImages, workers: int) -> None:
    sampler = _sampler(data, prefetch=4, workers=workers)
    stream = sampler.stream()
    assert _prefetch_threads()
    for step, (sets, _) in enumerate(stream):
        np.testing.assert_array_equal(sets, sampler.batch(step)[0])
        if step == 9:
            break
    stream.close()
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(stream)
    with sampler.stream() as other:
        next(other)
    assert not _prefetch_threads()
    np.testing.assert_array_equal(next(iter(sampler))[0], sampler.batch(0)[0])


def test_prefetch_thread_reports_errors(data: LabelledImages, monkeypatch) -> None:
    sampler = _sampler(data, prefetch=2)
    original = SetSampler.batch

    def failing(self: SetSampler, step: int):
        if step == 3:
            raise RuntimeError("disk vanished")
        return original(self, step)

    monkeypatch.setattr(SetSampler, "batch", failing)
    stream = sampler.stream()
    got = 0
    with pytest.raises(RuntimeError, match="disk vanished"):
        for _ in stream:
            got += 1
    assert got == 3 and not _prefetch_threads()


def test_bad_arguments(data: LabelledImages) -> None:
    with pytest.raises(ValueError, match=r"Classes \[3\] have fewer than ns=6"):
        _sampler(data, ns=6, classes=[3, 4])
    with pytest.raises(ValueError, match="no classes"):
        _sampler(data, classes=[])
    with pytest.raises(ValueError, match="host_index"):
        _sampler(data, host_index=2, host_count=2)
    with pytest.raises(ValueError, match="workers=0"):
        _sampler(data, workers=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        _sampler(data, batch_size=0)
    with pytest.raises(ValueError, match="step"):
        _sampler(data).batch(-1)


def test_evaluation_sets(data: LabelledImages) -> None:
    episodes = evaluation_sets(data.images, data.labels, [4, 1], ns=5, seed=0)
    assert [e.label for e in episodes] == [4, 1]
    for e, size in zip(episodes, (30, 12), strict=True):
        k = size // 5
        assert e.support_indices.shape == (k, 5) and e.support.shape == (k, 5, 3, 4, 5)
        used = np.concatenate([e.support_indices.ravel(), e.rest_indices])
        # Disjoint support sets and the remaining images together are exactly the class.
        assert len(set(used.tolist())) == used.size
        np.testing.assert_array_equal(np.sort(used), np.flatnonzero(data.labels == e.label))
        np.testing.assert_allclose(e.rest, _reference_float(data.images[e.rest_indices]))
        np.testing.assert_array_equal(e.pooled_support, e.support.reshape(-1, 3, 4, 5))
    again = evaluation_sets(data.images, data.labels, [1], ns=5, seed=0)[0]
    np.testing.assert_array_equal(again.support_indices, episodes[1].support_indices)
    other = evaluation_sets(data.images, data.labels, [4], ns=5, seed=1)[0]
    assert not np.array_equal(other.support_indices, episodes[0].support_indices)
    two = evaluation_sets(data.images, data.labels, [4], ns=5, num_sets=2)[0]
    assert two.support_indices.shape == (2, 5) and two.rest_indices.size == 20
    with pytest.raises(ValueError, match="too few"):
        evaluation_sets(data.images, data.labels, [3], ns=5, num_sets=2)


def test_real_cifar_fc100_sampler() -> None:
    path = shared_path("data", "cifar100", "cifar100_subset.npz")
    config = DataConfig(
        data_dir=path, split="test", ns=5, batch_size=8, flips=True, prefetch=2, workers=2
    )
    data, split = load_dataset(config)
    sampler = make_sampler(config, data, split)
    assert not sampler.flips, "flips apply only to the training split"
    assert (sampler.ns, sampler.batch_size, sampler.workers) == (5, 8, 2)
    with sampler.stream(0, 2) as stream:
        for step, (sets, labels) in enumerate(stream):
            assert sets.shape == (8, 5, 3, 32, 32)
            assert set(labels.tolist()) <= set(split.test)
            # Set membership on real data: each image is the dataset image of the set's class.
            index, _ = sampler.indices(step)
            np.testing.assert_array_equal(data.labels[index], labels[:, None].repeat(5, 1))
            np.testing.assert_allclose(sets, _reference_float(data.images[index]), atol=1.2e-7)
    episodes = sampler.evaluation(num_sets=10)
    assert len(episodes) == 20 and episodes[0].rest.shape == (120, 3, 32, 32)
    assert sampler.evaluation(num_sets=2, ns=3)[0].support.shape == (2, 3, 3, 32, 32)
    np.testing.assert_array_equal(data.labels[episodes[0].rest_indices], episodes[0].label)
    with pytest.raises(ValueError, match="multiple of the host count"):
        make_sampler(config, data, split, host_count=3)
