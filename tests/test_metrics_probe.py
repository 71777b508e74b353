"""The few-shot classification probe on configurations whose answer is known."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.metrics.probe import fewshot_probe, nearest_context_classify


def test_nearest_context_classify_handcrafted():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    queries = np.array([[1.0, 0.0], [9.0, 1.0], [0.0, 9.0], [5.1, 0.0]])
    truth = np.array([0, 0, 2, 1])
    result = nearest_context_classify(queries, truth, centres, classes=[7, 8, 9])
    expected = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.accuracy == 0.75
    assert result.top5_accuracy == 1.0  # three classes: all are in the top 5
    assert result.per_class_accuracy == {7: 0.5, 8: 1.0, 9: 1.0}
    assert result.classes == (7, 8, 9) and result.num_queries == 4
    assert json.loads(json.dumps(result.to_dict()))["confusion"] == expected.tolist()


def test_top5_counts_strictly_nearer_classes():
    centres = np.arange(10.0)[:, None]  # class i sits at i
    queries = np.array([[9.0], [3.0], [2.0]])  # all of class 0
    result = nearest_context_classify(queries, np.zeros(3, dtype=np.int64), centres)
    # Classes strictly nearer than class 0: nine, five (1..5) and three (1..3).
    assert result.top5_accuracy == pytest.approx(1 / 3)
    assert result.accuracy == 0.0


def test_cosine_metric_ignores_scale():
    centres = np.array([[1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[100.0, 1.0], [0.01, 0.02]])
    result = nearest_context_classify(queries, np.array([0, 1]), centres, metric="cosine")
    assert result.accuracy == 1.0


def _clusters(colours: np.ndarray, per_class: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    k = colours.shape[0]
    labels = np.repeat(np.arange(k), per_class)
    pixels = colours[labels][:, :, None, None] + noise * rng.normal(size=(k * per_class, 3, 4, 4))
    images = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return images, labels


def _mean_colour(x):
    return jnp.mean(x, axis=(0, 2, 3))


def test_probe_separates_well_separated_clusters():
    colours = np.array([[30, 30, 30], [200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
    images, labels = _clusters(colours.astype(float), per_class=30, noise=8.0, seed=0)
    result = fewshot_probe(
        _mean_colour, images, labels + 10, ns=5, num_episodes=3, queries_per_class=10, batch_size=8
    )
    assert result.accuracy == 1.0 and result.top5_accuracy == 1.0
    np.testing.assert_array_equal(result.confusion, 30 * np.eye(5, dtype=np.int64))
    assert result.classes == (10, 11, 12, 13, 14)
    assert result.per_class_accuracy == {c: 1.0 for c in range(10, 15)}


def test_probe_confuses_exactly_the_indistinguishable_classes():
    # Classes 0 and 1 share one distribution; 2..5 are far apart.
    colours = np.array(
        [
            [100, 100, 100],
            [100, 100, 100],
            [10, 10, 10],
            [240, 10, 10],
            [10, 240, 10],
            [10, 10, 240],
        ]
    )
    images, labels = _clusters(colours.astype(float), per_class=30, noise=10.0, seed=1)
    result = fewshot_probe(
        _mean_colour,
        images,
        labels,
        ns=5,
        num_episodes=6,
        queries_per_class=10,
        batch_size=8,
        embed_query=lambda x: jnp.mean(x, axis=(1, 2)),
    )
    block = result.confusion[:2, :2]
    assert block.sum() == 2 * 60  # queries of 0 and 1 are only ever assigned to 0 or 1
    np.testing.assert_array_equal(result.confusion[2:, 2:], 60 * np.eye(4, dtype=np.int64))
    assert np.trace(block) / block.sum() < 0.75  # near chance between the two
    assert result.top5_accuracy == 1.0
    assert result.accuracy == pytest.approx((np.trace(block) + 240) / 360)


def test_probe_explains_bad_input():
    images = np.zeros((20, 3, 4, 4), dtype=np.uint8)
    labels = np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match="lower ns or queries_per_class"):
        fewshot_probe(_mean_colour, images, labels, ns=5, queries_per_class=10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fewshot_probe(_mean_colour, images, labels, classes=[0], ns=2, queries_per_class=2)


class _ScaledMeanColour(eqx.Module):
    """An embedding holding weights, as the FSDM model does; ``traces`` counts compilations."""

    scale: jax.Array
    traces: list = eqx.field(static=True)

    def __call__(self, x_set):
        self.traces.append(1)  # runs only while tracing
        return self.scale * _mean_colour(x_set)


def test_a_pytree_embedding_compiles_once_for_new_weights():
    colours = np.array([[30, 30, 30], [200, 30, 30], [30, 200, 30]])
    images, labels = _clusters(colours.astype(float), per_class=20, noise=8.0, seed=0)
    traces: list = []
    for scale in (1.0, 2.0):
        result = fewshot_probe(
            _ScaledMeanColour(jnp.asarray(scale), traces), images, labels, ns=5,
            num_episodes=2, queries_per_class=5, batch_size=8,
        )  # fmt: skip
        assert result.accuracy == 1.0
    assert len(traces) == 2  # support sets and one-image queries, each compiled once
