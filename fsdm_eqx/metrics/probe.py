"""Few-shot classification probe: how well the set encoder's contexts separate unseen classes.

Each episode draws, for every evaluated class, a support set of ``ns`` images and
``queries_per_class`` further query images of that class. A class is represented by the context
of its support set (the encoder's mean context); a query by the context of the set made of that
query alone (or by ``embed_query``), and is assigned to the nearest class context. Accuracy,
top-5 accuracy, per-class accuracy and the confusion matrix are pooled over the episodes. This
measures the encoder apart from the generator: a context that does not identify its class
cannot condition the denoiser on it.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, Integer, UInt8

from ..batching import map_in_batches
from ..data.pixels import to_float
from .fewshot import labelled_images

__all__ = ["ProbeResult", "fewshot_probe", "nearest_context_classify"]

Metric = Literal["euclidean", "cosine"]
EmbedFn = Callable[[Float[Array, "m c h w"]], Float[Array, "..."]]
EmbedQueryFn = Callable[[Float[Array, "c h w"]], Float[Array, "..."]]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """The probe's figures, pooled over all queries of all episodes."""

    accuracy: float
    """Fraction of queries whose nearest class context is their own class."""
    top5_accuracy: float
    """Fraction whose class is among the 5 nearest (all classes if there are fewer than 5)."""
    per_class_accuracy: dict[int, float]
    """Accuracy over the queries of each class."""
    confusion: np.ndarray
    """Counts, row = true class, column = predicted class, both in the order of `classes`."""
    classes: tuple[int, ...]
    """The class labels, in the order of the confusion matrix."""
    num_queries: int
    """Queries classified in all."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (class keys as strings, the confusion matrix as lists)."""
        return {
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5_accuracy,
            "per_class_accuracy": {str(c): a for c, a in self.per_class_accuracy.items()},
            "confusion": self.confusion.tolist(),
            "classes": list(self.classes),
            "num_queries": self.num_queries,
        }


def _flatten(name: str, contexts: np.ndarray) -> np.ndarray:
    contexts = np.asarray(contexts, dtype=np.float64)
    if contexts.ndim < 1:
        raise ValueError(f"{name} must have one row per item; got a scalar.")
    flat = contexts.reshape(contexts.shape[0], -1)
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"{name} contains NaN or infinite values; check the encoder.")
    return flat


def _distances(queries: np.ndarray, centres: np.ndarray, metric: Metric) -> np.ndarray:
    if metric == "euclidean":
        sq = (queries**2).sum(1)[:, None] - 2.0 * queries @ centres.T + (centres**2).sum(1)[None]
        return np.maximum(sq, 0.0)
    if metric == "cosine":
        qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        cn = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ cn.T
    raise ValueError(f"metric={metric!r} is not allowed; choose 'euclidean' or 'cosine'.")


def _classify(
    queries: np.ndarray, truth: np.ndarray, centres: np.ndarray, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class index of each query, and whether its class is among the top 5."""
    d = _distances(queries, centres, metric)
    predicted = np.argmin(d, axis=1)
    # The rank of the true class: how many classes are strictly nearer.
    rank = (d < d[np.arange(len(truth)), truth][:, None]).sum(axis=1)
    return predicted, rank < min(5, centres.shape[0])


def _result(
    truth: np.ndarray, predicted: np.ndarray, top5: np.ndarray, classes: tuple[int, ...]
) -> ProbeResult:
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {
        c: float(confusion[i, i] / confusion[i].sum())
        for i, c in enumerate(classes)
        if confusion[i].sum()
    }
    return ProbeResult(
        accuracy=float(np.mean(truth == predicted)),
        top5_accuracy=float(np.mean(top5)),
        per_class_accuracy=per_class,
        confusion=confusion,
        classes=classes,
        num_queries=int(truth.size),
    )


def nearest_context_classify(
    query_contexts: Float[np.ndarray, "q ..."],
    query_classes: Integer[np.ndarray, " q"],
    class_contexts: Float[np.ndarray, "k ..."],
    *,
    classes: Sequence[int] | None = None,
    metric: Metric = "euclidean",
) -> ProbeResult:
    """Assign each query to the nearest class context and score the assignment.

    **Arguments:**
    - `query_contexts`: one context per query (flattened to a vector).
    - `query_classes`: the true class of each query, as an index into `class_contexts`.
    - `class_contexts`: one context per class.
    - `classes`: the labels of the classes, in order (default ``0 .. k-1``).
    - `metric`: squared `euclidean` distance or `cosine` distance.

    **Returns:** a `ProbeResult`.
    """
    queries = _flatten("query_contexts", query_contexts)
    centres = _flatten("class_contexts", class_contexts)
    if queries.shape[1] != centres.shape[1]:
        raise ValueError(
            f"query contexts have {queries.shape[1]} values and class contexts "
            f"{centres.shape[1]}; embed both with the same encoder, into contexts whose size "
            "does not depend on the set size (pooling='none' gives one token per image: pool "
            "its tokens in `embed`)."
        )
    truth = np.asarray(query_classes, dtype=np.int64)
    k = centres.shape[0]
    if truth.size and (truth.min() < 0 or truth.max() >= k):
        raise ValueError(f"query_classes must index the {k} class contexts (0 .. {k - 1}).")
    labels = tuple(range(k)) if classes is None else tuple(int(c) for c in classes)
    if len(labels) != k:
        raise ValueError(f"classes has {len(labels)} labels for {k} class contexts.")
    predicted, top5 = _classify(queries, truth, centres, metric)
    return _result(truth, predicted, top5, labels)


@eqx.filter_jit
def _embed_each(embed: Callable[[Array], Array], x: Array) -> Array:
    """``embed`` of each item of ``x``. Compiled once per shape and per static part of ``embed``:
    an embedding that is a PyTree (an `eqx.Module` holding the model) compiles once for all the
    evaluations of a run."""
    return jax.vmap(embed)(x)


def fewshot_probe(
    embed: EmbedFn,
    images: UInt8[np.ndarray, "n c h w"],
    labels: Integer[np.ndarray, " n"],
    *,
    classes: Sequence[int] | None = None,
    ns: int = 5,
    num_episodes: int = 10,
    queries_per_class: int = 15,
    seed: int = 0,
    embed_query: EmbedQueryFn | None = None,
    metric: Metric = "euclidean",
    batch_size: int = 64,
) -> ProbeResult:
    """Few-shot classification of query images of (unseen) classes by nearest class context.

    In each episode every class gets a random support set of ``ns`` images and
    ``queries_per_class`` other images as queries (all distinct within the episode). The class
    context is ``embed(support)``; a query's context is ``embed_query(query)``, by default
    ``embed(query[None])``, the context of a one-image set. Images are given to the encoder in
    [-1, 1] (`fsdm_eqx.data.pixels.to_float`).

    **Arguments:**
    - `embed`: maps one set ``(m, c, h, w)`` in [-1, 1] to its context (any shape, flattened);
      for the FSDM model, its encoder's (posterior mean) context. Called under `jax.vmap`.
    - `images`, `labels`: the dataset, uint8 channel-first, and the class of each image.
    - `classes`: the classes to evaluate (default: every label present).
    - `ns`: support images per class.
    - `num_episodes`: episodes; the figures pool their queries.
    - `queries_per_class`: queries per class per episode.
    - `seed`: seed of the episodes.
    - `embed_query`: maps one image to a context; default, `embed` of a one-image set.
    - `metric`: squared `euclidean` or `cosine` distance.
    - `batch_size`: sets or queries per encoder call.

    **Returns:** a `ProbeResult` over ``num_episodes * len(classes) * queries_per_class`` queries.
    """
    images, labels = labelled_images(images, labels)
    if min(ns, num_episodes, queries_per_class, batch_size) < 1:
        raise ValueError("ns, num_episodes, queries_per_class and batch_size must all be >= 1.")
    chosen = tuple(int(c) for c in (np.unique(labels) if classes is None else classes))
    if len(chosen) < 2:
        raise ValueError(f"the probe needs at least 2 classes; got {len(chosen)}.")
    members = [np.flatnonzero(labels == c) for c in chosen]
    need = ns + queries_per_class
    for c, m in zip(chosen, members, strict=True):
        if m.size < need:
            raise ValueError(
                f"class {c} has {m.size} images, fewer than ns + queries_per_class = {need}; "
                "lower ns or queries_per_class."
            )

    def embed_sets(x: Float[Array, "b m c h w"]) -> Array:
        return _embed_each(embed, x)

    def embed_queries(x: Float[Array, "b c h w"]) -> Array:
        if embed_query is None:
            return _embed_each(embed, x[:, None])  # each query as a one-image set
        return _embed_each(embed_query, x)

    rng = np.random.default_rng(seed)
    truth, predicted, top5 = [], [], []
    for _ in range(num_episodes):
        drawn = np.stack([rng.choice(m, need, replace=False) for m in members])
        supports = to_float(images[drawn[:, :ns]])
        queries = to_float(images[drawn[:, ns:].reshape(-1)])
        centres = _flatten("class contexts", map_in_batches(embed_sets, (supports,), batch_size))
        points = _flatten("query contexts", map_in_batches(embed_queries, (queries,), batch_size))
        episode_truth = np.repeat(np.arange(len(chosen)), queries_per_class)
        p, t5 = _classify(points, episode_truth, centres, metric)
        truth.append(episode_truth)
        predicted.append(p)
        top5.append(t5)
    return _result(np.concatenate(truth), np.concatenate(predicted), np.concatenate(top5), chosen)
