"""Transfer figures: nearest-class-mean accuracy and distances to the support, against loops."""

import numpy as np
import pytest
from jaxtyping import TypeCheckError

from fsdm_eqx.metrics.transfer import nearest_class_accuracy, support_distances


def test_nearest_class_accuracy_matches_a_loop():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((30, 1, 3, 3))
    reference_labels = np.repeat(np.array([4, 7, 9]), 10)
    images = rng.standard_normal((25, 1, 3, 3))
    labels = rng.choice([4, 7, 9], 25)
    means = {c: reference[reference_labels == c].reshape(10, -1).mean(0) for c in (4, 7, 9)}
    hits = 0
    for x, y in zip(images.reshape(25, -1), labels, strict=True):
        predicted = min(means, key=lambda c: float(np.sum((x - means[c]) ** 2)))
        hits += predicted == y
    got = nearest_class_accuracy(images, labels, reference, reference_labels)
    assert got == pytest.approx(hits / 25)
    # the class means themselves are classified perfectly
    stacked = np.stack([means[c].reshape(1, 3, 3) for c in (4, 7, 9)])
    assert nearest_class_accuracy(stacked, np.array([4, 7, 9]), reference, reference_labels) == 1.0


def test_nearest_class_accuracy_rejects_labels_without_reference():
    with pytest.raises(ValueError, match="no reference"):
        nearest_class_accuracy(
            np.zeros((2, 4)), np.array([0, 5]), np.zeros((3, 4)), np.zeros(3, np.int64)
        )


def test_support_distances_match_a_loop_and_see_copies():
    rng = np.random.default_rng(1)
    supports = rng.standard_normal((4, 5, 1, 2, 2))
    images = rng.standard_normal((4, 1, 2, 2))
    images[2] = supports[2, 3]  # a copy of one of its support images
    want = [min(np.linalg.norm(images[i] - s) for s in supports[i]) for i in range(4)]
    got = support_distances(images, supports)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[2] == 0.0
    with pytest.raises((ValueError, TypeCheckError)):  # the run-time shape check, or ours
        support_distances(images, supports[:3])
