"""The shared shape of the package's one-config command lines (``export``, ``sample``)."""

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

C = TypeVar("C")


def run_config_cli(
    config_type: type[C],
    run: Callable[[C], object],
    argv: Sequence[str] | None,
    *,
    description: str,
    errors: tuple[type[Exception], ...],
) -> None:
    """Parse ``argv`` into a ``config_type`` (every field a flag) and run it, turning the
    expected failures into a one-line ``error: ...`` exit instead of a traceback.

    **Arguments:**
    - `config_type`: the dataclass the flags fill.
    - `run`: what to do with the parsed config.
    - `argv`: the arguments (default ``sys.argv[1:]``).
    - `description`: the ``--help`` text.
    - `errors`: the exceptions reported as ``error: <message>`` with a non-zero exit.
    """
    import tyro

    try:
        config = tyro.cli(
            config_type,
            args=sys.argv[1:] if argv is None else list(argv),
            description=description,
        )
        run(config)
    except errors as e:
        sys.exit(f"error: {e}")
