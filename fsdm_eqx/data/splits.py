"""Class-disjoint few-shot splits: every image of a class belongs to exactly one split.

- ``fc100``: CIFAR-100 by superclass, 12/4/4 superclasses = 60/20/20 classes (Oreshkin et al.
  2018), the lists pinned in `cifar100.FC100_SUPERCLASSES`.
- ``random``: a seeded random partition of the classes (the reference's ``cifar100mix`` for
  CIFAR-100: 60/20/20).
- ``background_evaluation``: Omniglot's official split, background characters for training and
  evaluation characters for testing; a seeded tenth of the background characters is held out
  of training for validation (the official split has none).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from jaxtyping import Integer

from .cifar100 import FINE_LABEL_NAMES, fc100_classes

SplitName = Literal["fc100", "random", "background_evaluation"]
SplitPart = Literal["train", "val", "test"]
BACKGROUND_VAL_FRACTION = 0.1
"""The share of Omniglot's background characters held out for validation."""
SPLIT_NAMES: tuple[str, ...] = ("fc100", "random", "background_evaluation")
PARTS: tuple[str, ...] = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Which classes are seen in training, used for validation, and held out for testing."""

    name: str
    """The split rule (see `class_split`)."""
    seed: int
    """The seed of a random split (recorded for every rule)."""
    train: tuple[int, ...]
    """Class indices of the training split, sorted."""
    val: tuple[int, ...]
    """Class indices of the validation split, sorted."""
    test: tuple[int, ...]
    """Class indices of the test split, sorted."""
    class_names: tuple[str, ...]
    """Names of all classes of the dataset, indexed by class index."""

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for part in PARTS:
            classes = set(getattr(self, part))
            if classes & seen:
                raise ValueError(f"ClassSplit {self.name!r} puts a class in two splits.")
            seen |= classes

    def classes(self, part: SplitPart) -> tuple[int, ...]:
        """Class indices of one split."""
        if part not in PARTS:
            raise ValueError(f"Split {part!r} does not exist; choose 'train', 'val' or 'test'.")
        return getattr(self, part)

    def names(self, part: SplitPart) -> tuple[str, ...]:
        """Class names of one split."""
        return tuple(self.class_names[c] for c in self.classes(part))

    def to_dict(self) -> dict[str, Any]:
        """The split as plain JSON data (rule, seed and class names of each split), for a run's
        config."""
        return {"name": self.name, "seed": self.seed} | {p: list(self.names(p)) for p in PARTS}  # type: ignore[arg-type]


def class_split(
    name: SplitName,
    labels: Integer[np.ndarray, " n"],
    *,
    class_names: Sequence[str],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> ClassSplit:
    """Split the classes present in `labels` into disjoint train / val / test sets.

    **Arguments:**

    - `name`: ``"fc100"`` (CIFAR-100 only), ``"random"``, or ``"background_evaluation"``
        (Omniglot loaded with both subsets).
    - `labels`: the class index of every image.
    - `class_names`: the name of every class, as in `LabelledImages.class_names`.
    - `seed`: the seed of the ``random`` split and of ``background_evaluation``'s validation
        hold-out.
    - `fractions`: train / val / test fractions of the classes for the ``random`` split.

    **Returns:**

    A `ClassSplit`.
    """
    present = np.unique(labels).astype(int).tolist()
    names = tuple(class_names)
    if present and present[-1] >= len(names):
        raise ValueError(f"labels go up to {present[-1]} but only {len(names)} class names given.")
    parts: dict[str, list[int]]
    if name == "fc100":
        if names != FINE_LABEL_NAMES:
            raise ValueError(
                "The fc100 split needs the 100 CIFAR-100 classes in their official order; load "
                "the data with load_cifar100, or use the 'random' split."
            )
        parts = {p: [names.index(f) for f in fc100_classes(p)] for p in PARTS}
    elif name == "random":
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions={fractions} must be three non-negative numbers summing to 1."
            )
        order = np.random.default_rng(seed).permutation(np.asarray(present, dtype=np.int64))
        n_train = round(fractions[0] * len(order))
        n_val = round(fractions[1] * len(order))
        parts = {
            "train": order[:n_train].tolist(),
            "val": order[n_train : n_train + n_val].tolist(),
            "test": order[n_train + n_val :].tolist(),
        }
    elif name == "background_evaluation":
        background = [c for c in present if names[c].startswith("background")]
        order = np.random.default_rng(seed).permutation(np.asarray(background, dtype=np.int64))
        n_val = round(BACKGROUND_VAL_FRACTION * len(order))
        parts = {
            "train": order[n_val:].tolist(),
            "val": order[:n_val].tolist(),
            "test": [c for c in present if names[c].startswith("evaluation")],
        }
        if not background or not parts["test"]:
            raise ValueError(
                "The background_evaluation split needs Omniglot loaded with both the background "
                "and the evaluation subsets."
            )
    else:
        raise ValueError(
            f"Class split {name!r} does not exist; choose one of {', '.join(SPLIT_NAMES)}."
        )
    return ClassSplit(
        name=name,
        seed=seed,
        train=tuple(sorted(parts["train"])),
        val=tuple(sorted(parts["val"])),
        test=tuple(sorted(parts["test"])),
        class_names=names,
    )
