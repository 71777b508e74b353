"""The experiment's command line, generated from `ExperimentConfig` by `tyro`.

``--preset NAME`` picks the defaults (one of `PRESETS`); every field of the configs is a flag.
"""

import argparse
import sys
from collections.abc import Sequence

from ..data.download import DataError
from ..metrics._inception_weights import InceptionWeightsError
from ..train import initialize_distributed
from ..train.checkpoint import CheckpointError
from .config import PRESETS, ExperimentConfig
from .run import run_experiment

__all__ = ["main"]


def _parse_preset(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", default=None)
    known, rest = parser.parse_known_args(list(argv))
    return known.preset, rest


def main(argv: Sequence[str] | None = None, *, default_preset: str = "paper-cifar100") -> None:
    """The command line: ``--preset NAME`` picks the defaults, every field can be set.

    **Arguments:**
    - `argv`: the arguments (default ``sys.argv[1:]``).
    - `default_preset`: the preset used without ``--preset``.
    """
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    preset, rest = _parse_preset(argv)
    preset = default_preset if preset is None else preset
    if preset not in PRESETS:
        sys.exit(
            f"error: --preset {preset!r} is not known; choose one of "
            f"{', '.join(repr(n) for n in PRESETS)}."
        )
    description = (
        "Train few-shot diffusion (FSDM) and evaluate it on unseen classes.\n\n"
        f"--preset {{{','.join(PRESETS)}}}: the defaults below (now: {preset}; "
        f"default: {default_preset})."
    )
    try:
        config = tyro.cli(
            ExperimentConfig, args=rest, default=PRESETS[preset], description=description
        )
        initialize_distributed()  # joins a multi-host run described by the environment
        run_experiment(config)
    except (
        ValueError,
        DataError,
        InceptionWeightsError,
        CheckpointError,
        FileNotFoundError,
    ) as e:
        sys.exit(f"error: {e}")
