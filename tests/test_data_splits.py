"""Class-disjoint splits: FC100 against torchmeta's lists, the seeded random split, Omniglot's."""

import json

import numpy as np
import pytest
from jaxtyping import TypeCheckError

from fsdm_eqx.data import FC100_SUPERCLASSES, SUPERCLASSES, ClassSplit, class_split
from fsdm_eqx.data.cifar100 import FINE_LABEL_NAMES
from tests.conftest import shared_path

# torchmeta's files, read with the search tools (github.com/tristandeleu/pytorch-meta):
# torchmeta/datasets/assets/cifar100/fc100/train.json and .../fc100/test.json, verbatim.
TORCHMETA_TRAIN = json.loads(
    '["fish","flowers","food_containers","fruit_and_vegetables","household_electrical_devices",'
    '"household_furniture","large_man-made_outdoor_things","large_natural_outdoor_scenes",'
    '"reptiles","trees","vehicles_1","vehicles_2"]'
)
TORCHMETA_TEST = json.loads('["aquatic_mammals","insects","medium_mammals","people"]')

LABELS = np.repeat(np.arange(100), 3)


@pytest.fixture(scope="module")
def fc100() -> ClassSplit:
    return class_split("fc100", LABELS, class_names=FINE_LABEL_NAMES)


def test_fc100_matches_torchmeta(fc100: ClassSplit) -> None:
    assert list(FC100_SUPERCLASSES["train"]) == TORCHMETA_TRAIN
    assert list(FC100_SUPERCLASSES["test"]) == TORCHMETA_TEST
    # The validation superclasses are the 4 that neither torchmeta list names.
    rest = sorted(set(SUPERCLASSES) - set(TORCHMETA_TRAIN) - set(TORCHMETA_TEST))
    assert sorted(FC100_SUPERCLASSES["val"]) == rest and len(rest) == 4
    assert (len(fc100.train), len(fc100.val), len(fc100.test)) == (60, 20, 20)


def test_fc100_disjoint_and_whole_superclasses(fc100: ClassSplit) -> None:
    parts = [set(fc100.train), set(fc100.val), set(fc100.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(range(100))
    for part, superclasses in FC100_SUPERCLASSES.items():
        names = set(fc100.names(part))  # type: ignore[arg-type]
        expected = {f for s in superclasses for f in SUPERCLASSES[s]}
        assert names == expected
        # A union of whole superclasses: each superclass lies entirely inside or outside.
        for fines in SUPERCLASSES.values():
            assert set(fines) <= names or not set(fines) & names
    assert set(fc100.names("test")) >= {"baby", "beaver", "bee", "fox", "woman"}


def test_fc100_to_dict_is_json(fc100: ClassSplit) -> None:
    data = json.loads(json.dumps(fc100.to_dict()))
    assert data["name"] == "fc100" and len(data["train"]) == 60
    assert data["test"] == list(fc100.names("test"))


def test_random_split_deterministic_and_disjoint() -> None:
    a = class_split("random", LABELS, class_names=FINE_LABEL_NAMES, seed=3)
    b = class_split("random", LABELS, class_names=FINE_LABEL_NAMES, seed=3)
    c = class_split("random", LABELS, class_names=FINE_LABEL_NAMES, seed=4)
    assert a == b and a.train != c.train
    assert (len(a.train), len(a.val), len(a.test)) == (60, 20, 20)
    assert sorted(a.train + a.val + a.test) == list(range(100))
    # A random split almost surely cuts through superclasses, unlike FC100.
    names = set(a.names("train"))
    assert any(0 < len(set(f) & names) < 5 for f in SUPERCLASSES.values())


def test_random_split_of_present_classes_only() -> None:
    labels = np.array([1, 1, 4, 4, 7, 7, 9, 9, 2, 2])
    split = class_split("random", labels, class_names=[str(i) for i in range(10)], seed=0)
    assert sorted(split.train + split.val + split.test) == [1, 2, 4, 7, 9]
    assert (len(split.train), len(split.val), len(split.test)) == (3, 1, 1)


def test_background_evaluation_holds_out_a_seeded_tenth_for_validation() -> None:
    names = [f"background/a/c{i}" for i in range(40)] + [f"evaluation/b/c{i}" for i in range(7)]
    labels = np.repeat(np.arange(47), 3)
    split = class_split("background_evaluation", labels, class_names=names, seed=3)
    assert len(split.val) == 4 and len(split.train) == 36
    assert sorted(split.train + split.val) == list(range(40))
    assert split.test == tuple(range(40, 47))
    again = class_split("background_evaluation", labels, class_names=names, seed=3)
    other = class_split("background_evaluation", labels, class_names=names, seed=4)
    assert again.val == split.val and other.val != split.val


def test_bad_requests() -> None:
    with pytest.raises(ValueError, match="official order"):
        class_split("fc100", np.arange(10), class_names=[str(i) for i in range(10)])
    with pytest.raises((ValueError, TypeCheckError)):  # beartype catches it first in tests
        class_split("nope", LABELS, class_names=FINE_LABEL_NAMES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="summing to 1"):
        class_split("random", LABELS, class_names=FINE_LABEL_NAMES, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="both"):
        class_split("background_evaluation", np.arange(2), class_names=["background/a/b", "x"])
    with pytest.raises(ValueError, match="two splits"):
        ClassSplit("x", 0, (1, 2), (2,), (), ("a", "b", "c"))


def test_real_cifar_split_partitions_images() -> None:
    from fsdm_eqx.data import load_cifar100

    data = load_cifar100(shared_path("data", "cifar100", "cifar100_subset.npz"))
    split = class_split("fc100", data.labels, class_names=data.class_names)
    masks = [np.isin(data.labels, split.classes(p)) for p in ("train", "val", "test")]
    np.testing.assert_array_equal(sum(m.astype(int) for m in masks), np.ones(len(data), int))
    assert [int(m.sum()) for m in masks] == [60 * 170, 20 * 170, 20 * 170]
