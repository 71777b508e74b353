"""The layering of DESIGN.md, read from each module's import statements.

Data flows data -> nn -> diffusion -> train -> metrics/instrument -> experiment: a package never
imports one further down the flow, and `data` imports no JAX at all.
"""

import ast
from pathlib import Path

import pytest

import fsdm_eqx

PACKAGE = Path(fsdm_eqx.__file__).parent

FORBIDDEN = {
    "data": ("jax", "jaxlib", "equinox", "optax"),
    "nn": ("fsdm_eqx.train", "fsdm_eqx.metrics", "fsdm_eqx.experiment", "fsdm_eqx.instrument"),
    "diffusion": (
        "fsdm_eqx.train",
        "fsdm_eqx.metrics",
        "fsdm_eqx.experiment",
        "fsdm_eqx.instrument",
    ),
    "instrument": ("fsdm_eqx.experiment",),
    "metrics": ("fsdm_eqx.experiment",),
    "train": ("fsdm_eqx.experiment", "fsdm_eqx.metrics"),
}
"""Per subpackage, the modules (and everything under them) that none of its files may import."""


def imported_names(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every absolute name that ``path``'s imports bring in: ``import a.b`` gives ``a.b``, and
    ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a module); relative imports are
    resolved against the module's package, wherever they appear (functions included)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # a module's package; for an __init__.py, the package itself
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                assert node.module is not None
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_relative_and_nested_imports_are_resolved(tmp_path: Path) -> None:
    module = tmp_path / "fsdm_eqx" / "nn" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "from ..train import step\n"
        "from . import layers\n"
        "from .attention import MultiheadAttention\n"
        "def f():\n"
        "    import fsdm_eqx.metrics.fid\n"
    )
    assert imported_names(module, root=tmp_path) == {
        "fsdm_eqx.train",
        "fsdm_eqx.train.step",
        "fsdm_eqx.nn",
        "fsdm_eqx.nn.layers",
        "fsdm_eqx.nn.attention",
        "fsdm_eqx.nn.attention.MultiheadAttention",
        "fsdm_eqx.metrics.fid",
    }


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_no_import_goes_up_the_flow(subpackage: str) -> None:
    files = sorted((PACKAGE / subpackage).glob("*.py"))
    assert len(files) >= 3
    violations = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imported_names(path))
        for forbidden in FORBIDDEN[subpackage]
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert violations == []
