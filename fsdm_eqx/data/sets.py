"""The few-shot set sampler: batches of sets, each set `ns` distinct images of one class.

A batch is a pure function of ``(seed, step)``: step ``s`` of a resumed run is the same batch as
step ``s`` of an uninterrupted one. With several hosts, the global batch of ``batch_size *
host_count`` sets is drawn once from that seed and host ``h`` keeps its own contiguous slice, so
hosts see disjoint sets and their union does not depend on how many hosts there are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np
from jaxtyping import Float32, Int64, Integer, UInt8

from .pixels import to_float

Batch = tuple[Float32[np.ndarray, "b ns c h w"], Int64[np.ndarray, " b"]]


def _distinct_draws(
    rng: np.random.Generator, counts: Int64[np.ndarray, " m"], ns: int
) -> Int64[np.ndarray, "m ns"]:
    """For each row, `ns` distinct positions in ``[0, counts[row])``, uniformly.

    Rows with plenty of choices draw `ns` independent positions and redraw the whole row while
    any two coincide (rejection keeps the draw uniform over distinct tuples); rows with few
    choices (``counts < 4 * ns``) take the first `ns` of a random ordering instead.
    """
    out = np.empty((counts.size, ns), dtype=np.int64)
    small = counts < 4 * ns
    if small.any():
        keys = rng.random((int(small.sum()), int(counts[small].max())))
        keys[np.arange(keys.shape[1])[None, :] >= counts[small, None]] = np.inf
        out[small] = np.argsort(keys, axis=1, kind="stable")[:, :ns]
    todo = np.flatnonzero(~small)
    while todo.size:
        high = counts[todo, None]
        # floor(u * n) with u in [0, 1); the minimum guards the one rounding case u * n == n.
        draw = np.minimum((rng.random((todo.size, ns)) * high).astype(np.int64), high - 1)
        out[todo] = draw
        ordered = np.sort(draw, axis=1)
        todo = todo[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
    return out


class SetSampler:
    """Draws batches of few-shot sets from the classes of one split.

    Each set is `ns` distinct images of one class, the class drawn uniformly. With `flips`, as in
    the FSDM reference's augmentation, each set is flipped left-right with probability 1/2 and,
    independently, upside-down with probability 1/2, all its images alike.
    """

    def __init__(
        self,
        images: UInt8[np.ndarray, "n c h w"],
        labels: Integer[np.ndarray, " n"],
        classes: Sequence[int],
        *,
        ns: int,
        batch_size: int,
        seed: int = 0,
        flips: bool = False,
        host_index: int = 0,
        host_count: int = 1,
        prefetch: int = 2,
        workers: int = 1,
    ) -> None:
        """**Arguments:**

        - `images`: all images of the dataset, uint8 channel-first.
        - `labels`: the class of each image.
        - `classes`: the classes to draw from (one split).
        - `ns`: images per set.
        - `batch_size`: sets per batch on this host.
        - `seed`: the seed of the stream of batches.
        - `flips`: random flips of whole sets (training augmentation).
        - `host_index`, `host_count`: this host's place in a multi-host run.
        - `prefetch`: batches prepared ahead by `stream`'s background threads (0: none).
        - `workers`: background threads preparing them; more than one helps only on a host with
            idle cores (numpy releases the GIL in its array loops, not in the Python between).
        """
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels were given.")
        limits = (("ns", ns, 1), ("batch_size", batch_size, 1), ("host_count", host_count, 1),
                  ("prefetch", prefetch, 0), ("workers", workers, 1))  # fmt: skip
        for field, value, low in limits:
            if value < low:
                raise ValueError(f"SetSampler {field}={value} is not allowed; it must be >= {low}.")
        if not 0 <= host_index < host_count:
            raise ValueError(f"host_index={host_index} must lie in [0, host_count={host_count}).")
        self.classes = np.asarray(sorted(set(int(c) for c in classes)), dtype=np.int64)
        if self.classes.size == 0:
            raise ValueError("SetSampler got no classes to draw from; check the class split.")
        in_split = np.isin(labels, self.classes)
        order = np.flatnonzero(in_split)
        order = order[np.argsort(labels[order], kind="stable")]
        counts = np.bincount(
            np.searchsorted(self.classes, labels[order]), minlength=self.classes.size
        )
        small = self.classes[counts < ns]
        if small.size:
            raise ValueError(
                f"Classes {small[:10].tolist()} have fewer than ns={ns} images; lower ns or drop "
                "those classes."
            )
        self.images = images
        self.labels = labels
        self.ns = ns
        self.batch_size = batch_size
        self.seed = seed
        self.flips = flips
        self.host_index = host_index
        self.host_count = host_count
        self.prefetch = prefetch
        self.workers = workers
        self._order = order
        self._counts = counts
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._variants: np.ndarray | None = None
        if flips:
            # The split's images in all four orientations, (4, m, c, h, w), indexed by
            # 2 * left_right + upside_down: one contiguous gather then serves flipped sets too,
            # where flipping after the gather (reversed strides) costs several times more.
            base = images[order]
            self._variants = np.stack(
                [base, base[..., ::-1, :], base[..., ::-1], base[..., ::-1, ::-1]]
            )

    @property
    def set_shape(self) -> tuple[int, ...]:
        """Shape of one set, ``(ns, c, h, w)``."""
        return (self.ns, *self.images.shape[1:])

    def _draw(self, step: int) -> tuple[Int64[np.ndarray, "b ns"], np.ndarray]:
        """Positions in the class-sorted split of this host's sets at `step`, and flip flags."""
        if step < 0:
            raise ValueError(f"step={step} is not allowed; steps count from 0.")
        rng = np.random.default_rng([self.seed, step])
        total = self.batch_size * self.host_count
        which = rng.integers(0, self.classes.size, size=total)
        local = _distinct_draws(rng, self._counts[which], self.ns)
        flips = rng.random((total, 2)) < 0.5
        mine = slice(self.host_index * self.batch_size, (self.host_index + 1) * self.batch_size)
        position = self._starts[which[mine], None] + local[mine]
        return position, (flips[mine] if self.flips else np.zeros_like(flips[mine]))

    def indices(self, step: int) -> tuple[Int64[np.ndarray, "b ns"], np.ndarray]:
        """Dataset indices of this host's sets at `step`, and their ``(b, 2)`` flip flags
        (left-right, upside-down)."""
        position, flips = self._draw(step)
        return self._order[position], flips

    def batch(self, step: int) -> Batch:
        """This host's batch at `step`.

        **Returns:**

        ``(sets, labels)``: sets of shape ``(batch_size, ns, c, h, w)``, float32 in [-1, 1], and
        the class of each set.
        """
        position, flips = self._draw(step)
        index = self._order[position]
        if self._variants is None:
            sets = self.images[index]
        else:
            variant = 2 * flips[:, 0].astype(np.int64) + flips[:, 1]
            sets = self._variants[variant[:, None], position]
        return to_float(sets), self.labels[index[:, 0]].astype(np.int64)

    def stream(self, start_step: int = 0, num_steps: int | None = None) -> BatchStream:
        """Batches ``start_step, start_step + 1, ...``, prepared by a background thread.

        **Arguments:**

        - `start_step`: the first step (a resumed run passes the step it resumes at).
        - `num_steps`: how many batches; None for an endless stream.

        **Returns:**

        A `BatchStream`: iterate it, and close it (or use it as a context manager).
        """
        return BatchStream(self, start_step, num_steps)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.stream())

    def evaluation(
        self, num_sets: int | None = None, seed: int = 0, ns: int | None = None
    ) -> tuple[EvaluationClass, ...]:
        """Fixed evaluation sets for every class of this sampler (see `evaluation_sets`); `ns`
        defaults to the sampler's."""
        return evaluation_sets(
            self.images, self.labels, self.classes.tolist(), ns=ns or self.ns,
            num_sets=num_sets, seed=seed,
        )  # fmt: skip


THREAD_PREFIX = "fsdm_eqx-set-prefetch"


class BatchStream:
    """An iterator over the sampler's batches, the next `prefetch` prepared in background threads.

    Batches come out in step order whatever the number of threads. `close` cancels the pending
    batches and waits for the threads to end; iteration after `close` ends at once. An error in
    a background thread is raised by the `next` that would have returned its batch.
    """

    def __init__(self, sampler: SetSampler, start_step: int, num_steps: int | None) -> None:
        self._sampler = sampler
        self._next_step = start_step
        self._end = None if num_steps is None else start_step + num_steps
        self._closed = False
        self._pending: collections.deque[concurrent.futures.Future[Batch]] = collections.deque()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if sampler.prefetch > 0:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=sampler.workers, thread_name_prefix=THREAD_PREFIX
            )
            self._fill()

    def _more(self) -> bool:
        return self._end is None or self._next_step < self._end

    def _fill(self) -> None:
        assert self._executor is not None
        while len(self._pending) < self._sampler.prefetch and self._more():
            self._pending.append(self._executor.submit(self._sampler.batch, self._next_step))
            self._next_step += 1

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._executor is None:
            if not self._more():
                raise StopIteration
            self._next_step += 1
            return self._sampler.batch(self._next_step - 1)
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return batch

    def close(self) -> None:
        """Cancel the pending batches and wait for the background threads to end."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationClass:
    """The fixed evaluation material of one unseen class."""

    label: int
    """The class."""
    support_indices: Int64[np.ndarray, "k ns"]
    """Dataset indices of the `k` fixed support (conditioning) sets; disjoint."""
    rest_indices: Int64[np.ndarray, " r"]
    """Dataset indices of the class's images in no support set."""
    support: Float32[np.ndarray, "k ns c h w"]
    """The support sets, float32 in [-1, 1]."""
    rest: Float32[np.ndarray, "r c h w"]
    """The remaining real images, float32 in [-1, 1]."""

    @property
    def pooled_support(self) -> Float32[np.ndarray, "kns c h w"]:
        """All real images of the support sets, pooled (the FID reference of the few-shot
        protocol)."""
        return self.support.reshape(-1, *self.support.shape[2:])


def evaluation_sets(
    images: UInt8[np.ndarray, "n c h w"],
    labels: Integer[np.ndarray, " n"],
    classes: Sequence[int],
    *,
    ns: int = 5,
    num_sets: int | None = None,
    seed: int = 0,
) -> tuple[EvaluationClass, ...]:
    """Enumerate, per class, fixed disjoint support sets and the remaining real images.

    The images of class ``c`` are shuffled by a generator seeded with ``(seed, c)``, so the sets of
    a class do not depend on which other classes are evaluated. The first ``num_sets * ns``
    images form the support sets, in order; the rest are the remaining real images.

    **Arguments:**

    - `images`, `labels`: the dataset.
    - `classes`: the (unseen) classes to evaluate.
    - `ns`: images per support set.
    - `num_sets`: support sets per class; None for as many as fit (``n_c // ns``).
    - `seed`: the seed of the enumeration.

    **Returns:**

    One `EvaluationClass` per class, in the order of `classes`.
    """
    out: list[EvaluationClass] = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        k = members.size // ns if num_sets is None else num_sets
        if k < 1 or k * ns > members.size:
            raise ValueError(
                f"Class {c} has {members.size} images, too few for {num_sets or 1} sets of "
                f"ns={ns}; lower num_sets or ns."
            )
        shuffled = np.random.default_rng([seed, int(c)]).permutation(members)
        support = shuffled[: k * ns].reshape(k, ns).astype(np.int64)
        rest = np.sort(shuffled[k * ns :]).astype(np.int64)
        out.append(
            EvaluationClass(
                label=int(c),
                support_indices=support,
                rest_indices=rest,
                support=to_float(images[support]),
                rest=to_float(images[rest]),
            )
        )
    return tuple(out)
