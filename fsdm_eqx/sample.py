"""Generate images of a new class from a trained checkpoint and a folder of support images.

``python -m fsdm_eqx.sample --checkpoint runs/smoke --support-dir my_class/ --num 16`` loads the
newest checkpoint of the run directory (or the given ``step_*`` checkpoint, or a model file
written by ``python -m fsdm_eqx.export``), rebuilds the model from the experiment configuration
stored with it, reads the support images (PNG or JPEG,
any size and colour mode: centre-cropped to a square, resized to the model's side and converted to
its channels), generates ``--num`` images with the EMA model and writes them as
``sample_000.png``, ... and ``grid.png`` (the support row over the generated rows) in
``--out-dir``.
"""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8
from PIL import Image, UnidentifiedImageError

from ._cli import run_config_cli
from ._custom_types import NonNegativeFloat, NonNegativeInt, PositiveInt, SamplerName
from .config import check_fields, no_type_check
from .data.pixels import to_float, to_uint8
from .experiment.config import ExperimentConfig, experiment_config_from_dict
from .instrument.figures import rows_figure, write_png
from .nn.fsdm import FSDM
from .train.checkpoint import (
    METADATA_FILE,
    CheckpointError,
    read_checkpoint_metadata,
    restore_checkpoint,
    resumable_checkpoint,
)
from .train.state import init_train_state

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SupportImagesError(Exception):
    """The folder of support images is missing, empty or holds an unreadable image."""


@no_type_check
@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Generate images of the class shown by a folder of support images."""

    checkpoint: str
    """A run directory (its newest checkpoint is used), one ``step_*`` checkpoint directory, or
    an ``.npz`` file written by ``python -m fsdm_eqx.export``."""
    support_dir: str
    """Folder of the support images of the new class (PNG or JPEG, any size, RGB or gray)."""
    out_dir: str = "samples"
    """Where ``sample_XXX.png`` and ``grid.png`` are written (created if missing)."""
    num: PositiveInt = 16
    """Images to generate."""
    sampler: SamplerName = "ddim"
    """`ddpm` ancestral, `ddim` (deterministic) or `ode` (probability flow)."""
    steps: PositiveInt = 50
    """Respaced sampling steps (at most the diffusion steps of training)."""
    guidance_scale: NonNegativeFloat = 1.0
    """Classifier-free guidance on the context (1: none; needs a model trained with
    `ModelConfig.null_context_prob > 0`)."""
    batch_size: PositiveInt = 16
    """Images generated per compiled call."""
    columns: PositiveInt = 8
    """Images per row of ``grid.png`` (at least as many as there are support images)."""
    seed: NonNegativeInt = 0
    """Seed of the starting noise and of the sampler."""

    def __post_init__(self) -> None:
        check_fields(self)


def load_support_images(
    folder: str | Path, *, image_size: int, channels: int
) -> Float[np.ndarray, "m c h w"]:
    """Read every PNG/JPEG file of ``folder`` as one support set for the model.

    Each image is centre-cropped to a square, resized (bicubic) to ``image_size`` and converted to
    RGB (``channels == 3``) or gray (``channels == 1``); files are taken in name order.

    **Arguments:**
    - `folder`: the folder of images.
    - `image_size`: the model's image side.
    - `channels`: the model's channels, 1 or 3.

    **Returns:** the images in [-1, 1], channels first, float32.

    **Raises:** `SupportImagesError` when the folder is missing or holds no PNG/JPEG file, or
    when a file cannot be read as an image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not allowed; the model must have 1 or 3.")
    root = Path(folder)
    if not root.is_dir():
        raise SupportImagesError(
            f"--support-dir {root} is not a folder; pass a folder of PNG or JPEG images of one "
            "class."
        )
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SupportImagesError(
            f"--support-dir {root} holds no PNG or JPEG image; put a few images of one class there."
        )
    mode = "RGB" if channels == 3 else "L"
    images = []
    for path in files:
        try:
            with Image.open(path) as opened:
                image = opened.convert(mode)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SupportImagesError(
                f"{path} cannot be read as an image ({e}); remove it from --support-dir or "
                "replace it with a valid PNG or JPEG."
            ) from None
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
        images.append(pixels.transpose(2, 0, 1))
    return to_float(np.stack(images))


def _checkpoint_metadata(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory ``path`` names (a run directory's newest intact one, skipping
    damaged ones with a warning) and its metadata."""
    if not path.exists():
        raise CheckpointError(
            f"--checkpoint {path} does not exist; pass a run directory or a step_* checkpoint."
        )
    if not (path / METADATA_FILE).is_file():
        latest = resumable_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"--checkpoint {path} holds no complete checkpoint (no step_*/{METADATA_FILE}); "
                "pass a run directory of the experiment or one of its step_* directories."
            )
        path = latest
    metadata = read_checkpoint_metadata(path)
    if "experiment" not in metadata:
        raise CheckpointError(
            f"{path / METADATA_FILE} lacks the experiment configuration; sample from a "
            "checkpoint written by the experiment (experiments/*_fewshot.py)."
        )
    return path, metadata


def load_ema_model(checkpoint: str | Path) -> tuple[FSDM, ExperimentConfig, int]:
    """The EMA model of a checkpoint written by the experiment, in inference mode.

    **Arguments:**
    - `checkpoint`: a run directory (its newest checkpoint), a ``step_*`` directory, or an
      ``.npz`` file written by ``python -m fsdm_eqx.export`` (`fsdm_eqx.export.load_exported`).

    **Returns:** `(model, config, step)`: the EMA model, the experiment's configuration (read
    from the checkpoint's metadata) and the training step of the checkpoint.

    **Raises:** `CheckpointError` with one sentence when the checkpoint is missing, corrupt or
    was not written by the experiment.
    """
    path = Path(checkpoint)
    if path.suffix.lower() == ".npz" and not path.is_dir():
        from .export import load_exported  # the export module reads checkpoints through this one

        return load_exported(path)
    resolved, metadata = _checkpoint_metadata(path)
    try:
        config = experiment_config_from_dict(metadata["experiment"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"The experiment configuration stored with --checkpoint {path} cannot be read ({e})."
        ) from None
    model_key, train_key = jax.random.split(jax.random.PRNGKey(config.run.seed))
    like = init_train_state(
        FSDM(config.model, key=model_key),
        config.optim,
        key=train_key,
        total_steps=config.run.num_steps,
    )
    state, restored = restore_checkpoint(resolved, like)
    return eqx.nn.inference_mode(state.ema), config, int(restored["step"])


def generate(
    model: FSDM,
    support: Float[Array, "m c h w"],
    num: int,
    *,
    key: PRNGKeyArray,
    config: ExperimentConfig,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    guidance_scale: float = 1.0,
    batch_size: int = 16,
) -> Float[np.ndarray, "num c h w"]:
    """Generate ``num`` images of the class of ``support``, ``batch_size`` per compiled call.

    **Arguments:**
    - `model`: the (EMA) model.
    - `support`: the support set in [-1, 1], channels first.
    - `num`: how many images.
    - `key`: the randomness; call ``i`` uses ``fold_in(key, i)``.
    - `config`: the experiment configuration (its diffusion process).
    - `sampler`, `steps`: the sampler and its respaced steps (capped at the training steps).
    - `guidance_scale`: classifier-free guidance on the context (1: none).
    - `batch_size`: images per call; every call has this size, so it compiles once.

    **Returns:** the images in [-1, 1], channels first.
    """
    diffusion = dataclasses.replace(
        config.diffusion,
        sampler=sampler,
        sampling_steps=min(steps, config.diffusion.num_steps),
        guidance_scale=guidance_scale,
    )
    size = min(batch_size, num)

    @eqx.filter_jit
    def call(model: FSDM, support: Array, key: PRNGKeyArray) -> Array:
        return model.sample(support, size, key=key, diffusion_config=diffusion)

    chunks = [
        np.asarray(call(model, support, jax.random.fold_in(key, i)))
        for i in range(math.ceil(num / size))
    ]
    return np.concatenate(chunks)[:num]


def sample_grid(
    support: UInt8[np.ndarray, "m c h w"], generated: UInt8[np.ndarray, "n c h w"], columns: int
) -> UInt8[np.ndarray, "H W c"]:
    """The support images in the top row, the generated ones in rows of ``columns`` below.

    **Arguments:**
    - `support`, `generated`: uint8 images, channels first.
    - `columns`: images per generated row; the grid is as wide as the wider of the two.

    **Returns:** one uint8 image, channels last, with 2-pixel white borders.
    """
    per_row = max(columns, 1)
    rows = [support] + [generated[i : i + per_row] for i in range(0, len(generated), per_row)]
    return rows_figure(rows)


def run_sample(config: SampleConfig) -> list[Path]:
    """Load the checkpoint, read the support images, generate and write the PNG files.

    **Arguments:**
    - `config`: what to sample and where to write it.

    **Returns:** the paths written: one PNG per generated image, then ``grid.png``.
    """
    model, experiment, step = load_ema_model(config.checkpoint)
    support = load_support_images(
        config.support_dir,
        image_size=experiment.model.image_size,
        channels=experiment.model.channels,
    )
    images = generate(
        model,
        jnp.asarray(support),
        config.num,
        key=jax.random.PRNGKey(config.seed),
        config=experiment,
        sampler=config.sampler,
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        batch_size=config.batch_size,
    )
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generated = to_uint8(images)
    written = []
    for i, image in enumerate(generated):
        written.append(out / f"sample_{i:03d}.png")
        write_png(written[-1], image.transpose(1, 2, 0))
    written.append(out / "grid.png")
    write_png(written[-1], sample_grid(to_uint8(support), generated, config.columns))
    print(
        f"Wrote {len(generated)} images of the class of {len(support)} support images, from the "
        f"EMA model at step {step}, to {out} (grid.png: support row over generated rows).",
        flush=True,
    )
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """The command line ``python -m fsdm_eqx.sample``; every `SampleConfig` field is a flag.

    **Arguments:**
    - `argv`: the arguments (default ``sys.argv[1:]``).
    """
    run_config_cli(
        SampleConfig,
        run_sample,
        argv,
        description="Generate images of a new class from a checkpoint and its support images.",
        errors=(ValueError, CheckpointError, SupportImagesError),
    )


if __name__ == "__main__":
    main()
