"""The sampling entry point: support images read at any size and mode, checkpoint loading, the
generated PNGs against the model called directly, and one-sentence errors."""

import dataclasses
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fsdm_eqx.config import RunConfig
from fsdm_eqx.data.pixels import to_uint8
from fsdm_eqx.experiment import PRESETS
from fsdm_eqx.nn.fsdm import FSDM
from fsdm_eqx.sample import (
    SampleConfig,
    SupportImagesError,
    load_ema_model,
    load_support_images,
    main,
)
from fsdm_eqx.train import init_train_state, save_checkpoint

NUM, BATCH, STEPS = 3, 2, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-preset checkpoint with the experiment's metadata; its EMA differs from its model."""
    run_dir = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(PRESETS["smoke"], run=RunConfig(run_dir=str(run_dir), num_steps=7))
    model_key, train_key = jax.random.split(jax.random.PRNGKey(config.run.seed))
    state = init_train_state(
        FSDM(config.model, key=model_key), config.optim, key=train_key, total_steps=7
    )
    ema = jax.tree_util.tree_map(lambda x: x + 0.01 if _is_float(x) else x, state.ema)
    state = eqx.tree_at(lambda s: (s.ema, s.step), state, (ema, jnp.asarray(7, jnp.int32)))
    save_checkpoint(run_dir, state, keep=1, metadata={"experiment": dataclasses.asdict(config)})
    return run_dir


def _is_float(x: object) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def _write_support(folder: Path) -> None:
    """Three images of other sizes and modes: RGB PNG, gray JPEG, RGBA PNG (non-square)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(folder / "b.jpg", quality=100)
    rgba = np.zeros((20, 50, 4), np.uint8)
    rgba[..., :3] = (10, 120, 250)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(folder / "c.PNG")
    (folder / "notes.txt").write_text("not an image")


def test_support_images_sizes_and_modes(tmp_path: Path) -> None:
    _write_support(tmp_path)
    rgb = load_support_images(tmp_path, image_size=32, channels=3)
    assert rgb.shape == (3, 3, 32, 32) and rgb.dtype == np.float32
    # The first image: PIL's own bicubic resize of the same pixels, scaled to [-1, 1].
    reference = Image.open(tmp_path / "a.png").convert("RGB").resize((32, 32), Image.BICUBIC)
    expected = np.asarray(reference, np.float32).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(rgb[0], expected, atol=1e-6)
    # A constant gray JPEG stays constant after resizing; gray becomes three equal channels.
    np.testing.assert_allclose(rgb[1], 200 / 127.5 - 1, atol=2 / 127.5)
    # A constant 50x20 RGBA image: centre-cropped, resized, alpha dropped.
    for channel, value in enumerate((10, 120, 250)):
        np.testing.assert_allclose(rgb[2, channel], value / 127.5 - 1, atol=1e-6)
    gray = load_support_images(tmp_path, image_size=28, channels=1)
    assert gray.shape == (3, 1, 28, 28)
    luma = (10 * 299 + 120 * 587 + 250 * 114) / 1000  # ITU-R 601-2, PIL's "L" conversion
    np.testing.assert_allclose(gray[2, 0], luma / 127.5 - 1, atol=1 / 127.5)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt"])
def test_support_errors_are_one_sentence(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "support"
    if case != "missing":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    if case == "corrupt":
        (folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(SupportImagesError) as info:
        load_support_images(folder, image_size=32, channels=3)
    message = str(info.value)
    assert "\n" not in message
    expected = {"missing": "is not a folder", "empty": "holds no PNG or JPEG", "corrupt": "broken"}
    assert expected[case] in message and "--support-dir" in message


def test_sample_cli_matches_the_ema_model(checkpoint: Path, tmp_path: Path) -> None:
    support_dir = tmp_path / "support"
    _write_support(support_dir)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--support-dir", str(support_dir),
            "--out-dir", str(out), "--num", str(NUM), "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--columns", "2", "--seed", "3"]  # fmt: skip
    main(args)
    model, config, step = load_ema_model(checkpoint)
    assert step == 7 and config == dataclasses.replace(PRESETS["smoke"], run=config.run)
    # The EMA, not the raw model, was restored (the fixture shifted the EMA by 0.01).
    leaves = [x for x in jax.tree_util.tree_leaves(model) if _is_float(x)]
    fresh = FSDM(config.model, key=jax.random.split(jax.random.PRNGKey(0))[0])
    fresh_leaves = [x for x in jax.tree_util.tree_leaves(fresh) if _is_float(x)]
    np.testing.assert_allclose(leaves[0], fresh_leaves[0] + 0.01, atol=1e-6)

    support = load_support_images(support_dir, image_size=32, channels=3)
    # Reference: the model's own sampler, one call per batch of BATCH images.
    diffusion = dataclasses.replace(config.diffusion, sampler="ddim", sampling_steps=STEPS)
    key = jax.random.PRNGKey(3)
    direct = np.concatenate(
        [
            np.asarray(
                model.sample(
                    jnp.asarray(support), BATCH, key=jax.random.fold_in(key, i),
                    diffusion_config=diffusion,
                )
            )
            for i in range(2)
        ]
    )[:NUM]  # fmt: skip
    for i in range(NUM):
        written = np.asarray(Image.open(out / f"sample_{i:03d}.png"))
        assert written.shape == (32, 32, 3)
        diff = np.abs(written.astype(int) - to_uint8(direct[i]).transpose(1, 2, 0).astype(int))
        assert diff.max() <= 1  # quantisation of values a float ulp apart
    grid = np.asarray(Image.open(out / "grid.png"))
    # Support row of 3 images over two generated rows of at most 2: 3 rows, 3 columns.
    assert grid.shape == (3 * 34 + 2, 3 * 34 + 2, 3)
    np.testing.assert_array_equal(grid[2:34, 2:34], to_uint8(support[0]).transpose(1, 2, 0))
    np.testing.assert_array_equal(grid[36:68, 2:34], np.asarray(Image.open(out / "sample_000.png")))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "absent", "does not exist"),
        (lambda tmp: tmp, "holds no complete checkpoint"),
    ],
)
def test_checkpoint_errors(tmp_path: Path, make: object, message: str) -> None:
    support_dir = tmp_path / "support"
    _write_support(support_dir)
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(path), "--support-dir", str(support_dir)])
    text = str(info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_checkpoint_without_experiment_metadata(tmp_path: Path, checkpoint: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(checkpoint, copy)
    (meta,) = copy.glob("step_*/metadata.json")
    meta.write_text(meta.read_text().replace('"experiment"', '"other"'))
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(copy), "--support-dir", str(tmp_path)])
    assert "lacks the experiment configuration" in str(info.value.code)


def test_cli_bad_values_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", "x", "--support-dir", "y", "--num", "0"])
    assert info.value.code != 0
    assert "SampleConfig.num=0 is not allowed" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--support-dir", "--num", "--sampler", "--steps", "--out-dir"):
        assert flag in out, flag
    assert "default: 16" in out and "default: ddim" in out
    assert SampleConfig("a", "b").num == 16
