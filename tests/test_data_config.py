"""`DataConfig` validation, and the rule that `fsdm_eqx/data` imports no JAX."""

import ast
import dataclasses
from pathlib import Path

import pytest

import fsdm_eqx
from fsdm_eqx.config import DataConfig

DATA_DIR = Path(fsdm_eqx.__file__).parent / "data"


def test_defaults_are_the_paper_cifar_setting() -> None:
    config = DataConfig()
    assert (config.dataset, config.class_split, config.ns, config.image_size) == (
        "cifar100", "fc100", 6, 32,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ns = 3  # type: ignore[misc]
    assert fsdm_eqx.DataConfig is DataConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ns": 0}, r"DataConfig.ns=0 is not allowed; it must lie in \[1"),
        ({"prefetch": -1}, "DataConfig.prefetch=-1"),
        ({"workers": 0}, "DataConfig.workers=0"),
        ({"image_size": 28}, "DataConfig.image_size=28 is not allowed; choose one of 32"),
        ({"dataset": "mnist", "image_size": 28}, "FC100 splits CIFAR-100"),
        (
            {"dataset": "mnist", "image_size": 28, "class_split": "background_evaluation"},
            "Omniglot's split",
        ),
        (
            {"dataset": "omniglot", "omniglot_subsets": ("background", "nope")},
            "omniglot_subsets holds 'nope'",
        ),
        ({"dataset": "omniglot", "omniglot_subsets": ()}, "omniglot_subsets is empty"),
    ],
)
def test_bad_values_name_field_and_fix(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "imagenet"}, r"\.dataset='imagenet' is not allowed; choose one of"),
        ({"split": "dev"}, r"\.split='dev' is not allowed; choose one of 'train'"),
        ({"class_split": "tiered"}, r"\.class_split='tiered' is not allowed; choose one of"),
        ({"batch_size": 2.5}, r"DataConfig\.batch_size=2\.5 is not allowed; it must be an integer"),
    ],
)
def test_bad_types_without_runtime_checking(kwargs: dict[str, object], message: str) -> None:
    # In the tests beartype rejects these at the call; users without it get the ValueError.
    with pytest.raises(ValueError, match=message):
        DataConfig.__post_init__(_Fields(**kwargs))  # type: ignore[arg-type]


class _Fields:
    """DataConfig's defaults with some fields replaced, bypassing the checked ``__init__``."""

    def __init__(self, **kwargs: object) -> None:
        for field in dataclasses.fields(DataConfig):
            setattr(self, field.name, kwargs.get(field.name, field.default))


def test_valid_combinations() -> None:
    DataConfig(dataset="omniglot", class_split="background_evaluation", image_size=28)
    DataConfig(dataset="omniglot", class_split="random", image_size=32, split="val")
    DataConfig(dataset="mnist", class_split="random", image_size=28, flips=True)


def test_data_package_imports_no_jax() -> None:
    files = sorted(DATA_DIR.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"jax", "jaxlib", "equinox", "optax"}, f"{path.name}: {name}"
