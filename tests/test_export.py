"""Exporting the EMA model of a checkpoint to one .npz: the exact weights and configuration come
back, the sample command gives the same images from it, and bad files are one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fsdm_eqx.export import ExportConfig, ExportError, export_model, load_exported, main
from fsdm_eqx.sample import load_ema_model, main as sample_main
from tests import test_sample

checkpoint = test_sample.checkpoint  # the smoke-preset checkpoint at step 7, its EMA shifted


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "nested" / "model.npz"
    main(["--checkpoint", str(checkpoint), "--out", str(out)])
    return out


def test_export_holds_the_ema_weights_exactly(checkpoint: Path, exported: Path) -> None:
    assert [p.name for p in exported.parent.iterdir()] == ["model.npz"]  # no temporary left
    model, config, step = load_exported(exported)
    ema, ema_config, ema_step = load_ema_model(checkpoint)
    assert (config, step) == (ema_config, ema_step) and step == 7
    assert model.inference
    assert jax.tree_util.tree_structure(model) == jax.tree_util.tree_structure(ema)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(model), jax.tree_util.tree_leaves(ema), strict=True
    ):
        if isinstance(want, jax.Array):
            assert got.dtype == want.dtype, path
            np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
        else:
            assert got == want, path
    # Plain NumPy reads it: one entry per array under its tree path, the configuration as JSON.
    with np.load(exported) as archive:
        arrays = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(ema)}
        np.testing.assert_array_equal(
            archive[".encoder.trunk.cls_token"], arrays[".encoder.trunk.cls_token"]
        )
        assert json.loads(str(archive["__experiment__"]))["model"]["hdim"] == config.model.hdim
    # From a step_* directory: the same file contents.
    (step_dir,) = checkpoint.glob("step_*")
    again = exported.parent.parent / "again.npz"
    main(["--checkpoint", str(step_dir), "--out", str(again)])
    with np.load(exported) as a, np.load(again) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_sample_cli_gives_the_same_images_from_the_export(
    checkpoint: Path, exported: Path, tmp_path: Path
) -> None:
    support = tmp_path / "support"
    support.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            support / f"{i}.png"
        )
    outputs = {}
    for name, source in (("checkpoint", checkpoint), ("export", exported)):
        outputs[name] = tmp_path / name
        sample_main(["--checkpoint", str(source), "--support-dir", str(support),
                     "--out-dir", str(outputs[name]), "--num", "2", "--steps", "3",
                     "--batch-size", "2", "--seed", "5"])  # fmt: skip
    for file in ("sample_000.png", "sample_001.png", "grid.png"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(outputs["export"] / file)),
            np.asarray(Image.open(outputs["checkpoint"] / file)),
        )


def _rewrite(exported: Path, out: Path, change: str) -> None:
    """A copy of the export with one array of another shape, one missing, or another format."""
    model, config, step = load_exported(exported)
    export_model(model, config, step, out)
    with np.load(out) as archive:
        entries = {name: archive[name] for name in archive.files}
    if change == "shape":
        entries[".encoder.trunk.cls_token"] = np.zeros((1, 2, 3), np.float32)
    elif change == "missing":
        del entries[".encoder.trunk.cls_token"]
    elif change == "format":
        entries["__fsdm_eqx_export__"] = np.asarray(99)
    else:
        entries = {"weights": np.zeros(3)}
    np.savez(out, allow_pickle=False, **entries)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("text", "not a model exported by fsdm_eqx (not an .npz archive)"),
        ("truncated", "is damaged"),
        ("corrupt", "is damaged"),
        ("plain npz", "not a model exported by fsdm_eqx (it lacks the experiment configuration)"),
        ("format", "has export format 99"),
        ("shape", ".encoder.trunk.cls_token has shape (1, 2, 3) and dtype float32 in the file"),
        ("missing array", ".encoder.trunk.cls_token is missing"),
    ],
)
def test_bad_exports_are_one_sentence(
    exported: Path, tmp_path: Path, case: str, message: str
) -> None:
    path = tmp_path / "model.npz"
    data = exported.read_bytes()
    if case == "text":
        path.write_text("not an archive")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "corrupt":
        middle = len(data) // 2  # inside an array's data: its CRC no longer matches
        flipped = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        path.write_bytes(data[:middle] + flipped + data[middle + 8 :])
    elif case != "missing":
        _rewrite(exported, path, {"plain npz": "plain", "missing array": "missing"}.get(case, case))
    with pytest.raises(ExportError) as info:
        load_exported(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    # The sample command reports it as one line too.
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--checkpoint", str(path), "--support-dir", str(tmp_path)])
    assert str(exit_info.value.code) == f"error: {text}"


def test_cli_errors_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "m.npz")])
    assert str(info.value.code).startswith("error: ") and "does not exist" in str(info.value.code)
    assert not (tmp_path / "m.npz").exists()
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "model.bin")])
    assert info.value.code != 0
    assert "is not allowed; give a" in capsys.readouterr().err  # tyro's box wraps the rest
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--out" in out and "default: model.npz" in out
    assert ExportConfig("run").out == "model.npz"
