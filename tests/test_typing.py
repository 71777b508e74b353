"""Run-time shape checking reaches the library, whether a module's annotations are postponed or not.

The tests run with jaxtyping's import hook over `fsdm_eqx` and beartype (pyproject's pytest
`addopts`). For every module that keeps ``from __future__ import annotations`` (annotations kept
as strings, resolved when checked), and for a set of modules from each subpackage that evaluate
theirs at import, one public function or module `__call__` is given a wrongly shaped (or typed)
array and must raise jaxtyping's `TypeCheckError`, not a ValueError of the function's own and not
nothing. Everything is a few elements, or traced abstractly.
"""

import re
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import fsdm_eqx
from fsdm_eqx import batching
from fsdm_eqx.config import DiffusionConfig, OptimConfig, model_preset
from fsdm_eqx.data import pixels, sets
from fsdm_eqx.diffusion import gaussian, schedule
from fsdm_eqx.instrument import figures, norms
from fsdm_eqx.metrics import fid, transfer
from fsdm_eqx.nn import attention, conv, dit, fsdm, layers, posterior, unet, vit
from fsdm_eqx.train import objective, optimizer

PACKAGE = Path(fsdm_eqx.__file__).parent
KEY = jax.random.key(0)


def _labels_of_another_length() -> None:
    images = np.zeros((4, 1, 2, 2), np.uint8)
    sets.evaluation_sets(images, np.zeros(3, np.int64), [0], ns=1)


def _sampler_with_labels_of_another_length() -> None:
    images = np.zeros((4, 1, 2, 2), np.uint8)
    sets.SetSampler(images, np.zeros(3, np.int64), [0], ns=1, batch_size=1, prefetch=0)


def _schedule() -> schedule.Schedule:
    return schedule.make_schedule("linear", 10)


def _tiny_dit() -> dit.DiT:
    return dit.DiT(
        image_size=4, in_channels=1, patch_size=2, hidden=8, depth=1, num_heads=2,
        context_dim=4, key=KEY,
    )  # fmt: skip


def _tiny_unet() -> unet.UNet:
    return unet.UNet(
        in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
        attention_resolutions=(), channel_mult=(1,), num_heads=1, dropout=0.0, context_dim=4,
        conditioning="film", image_size=4, key=KEY,
    )  # fmt: skip


def _abstract_fsdm() -> fsdm.FSDM:
    return eqx.filter_eval_shape(fsdm.FSDM, model_preset("smoke"), key=KEY)


def _fsdm_context_of_one_image() -> None:
    config = model_preset("smoke")
    image = jnp.zeros((config.channels, config.image_size, config.image_size))
    eqx.filter_eval_shape(
        lambda m, x: m.leave_one_out_context(x, inference=True), _abstract_fsdm(), image
    )


def _loss_of_one_image() -> None:
    config = model_preset("smoke")
    loss = objective.fsdm_loss_fn(DiffusionConfig(num_steps=10, sampling_steps=2))
    image = jnp.zeros((config.channels, config.image_size, config.image_size))
    eqx.filter_eval_shape(loss, _abstract_fsdm(), image, KEY)


WRONG_CALLS: dict[str, list[tuple[str, Callable[[], object]]]] = {
    "fsdm_eqx.data.sets": [
        ("evaluation_sets", _labels_of_another_length),
        ("SetSampler.__init__", _sampler_with_labels_of_another_length),
    ],
    "fsdm_eqx.data.pixels": [("to_float", lambda: pixels.to_float(np.zeros(3, np.float32)))],
    "fsdm_eqx.batching": [
        ("index_keys", lambda: batching.index_keys(0, jnp.zeros((2, 2), jnp.int32)))
    ],
    "fsdm_eqx.nn.layers": [("patchify", lambda: layers.patchify(jnp.zeros((4, 4)), 2))],
    "fsdm_eqx.nn.vit": [
        ("shifted_patch_input", lambda: vit.shifted_patch_input(jnp.zeros((4, 4)), 1))
    ],
    "fsdm_eqx.nn.conv": [
        ("conv2d", lambda: conv.conv2d(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 2, 4))))
    ],
    "fsdm_eqx.nn.attention": [
        (
            "MultiheadAttention.__call__",
            lambda: attention.MultiheadAttention(8, num_heads=2, head_dim=4, key=KEY)(jnp.zeros(8)),
        )
    ],
    "fsdm_eqx.nn.posterior": [
        (
            "GaussianPosterior.__call__",
            lambda: posterior.GaussianPosterior(6, key=KEY)(jnp.zeros((2, 6))),
        )
    ],
    "fsdm_eqx.nn.dit": [
        ("DiT.__call__", lambda: _tiny_dit()(jnp.zeros((4, 4)), jnp.asarray(1.0), jnp.zeros(4)))
    ],
    "fsdm_eqx.nn.unet": [
        (
            "UNet.__call__",
            lambda: _tiny_unet()(jnp.zeros((4, 4)), jnp.asarray(1.0), jnp.zeros(4), inference=True),
        )
    ],
    "fsdm_eqx.nn.fsdm": [("FSDM.leave_one_out_context", _fsdm_context_of_one_image)],
    "fsdm_eqx.diffusion.schedule": [
        (
            "continuous_alpha_bar",
            lambda: schedule.continuous_alpha_bar(_schedule(), jnp.zeros(2)),
        )
    ],
    "fsdm_eqx.diffusion.gaussian": [
        (
            "q_sample",
            lambda: gaussian.q_sample(
                _schedule(), jnp.zeros((2, 3)), jnp.asarray(1), jnp.zeros((3, 2))
            ),
        )
    ],
    "fsdm_eqx.train.optimizer": [
        (
            "learning_rate_at",
            lambda: optimizer.learning_rate_at(OptimConfig(), jnp.zeros(2, jnp.int32), 10),
        )
    ],
    "fsdm_eqx.train.objective": [("fsdm_loss_fn.<locals>.loss_fn", _loss_of_one_image)],
    "fsdm_eqx.metrics.fid": [
        (
            "frechet_distance",
            lambda: fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)),
        )
    ],
    "fsdm_eqx.metrics.transfer": [
        (
            "support_distances",
            lambda: transfer.support_distances(np.zeros((2, 4)), np.zeros((3, 1, 4))),
        )
    ],
    "fsdm_eqx.instrument.figures": [("heatmap", lambda: figures.heatmap(np.zeros(3)))],
    "fsdm_eqx.instrument.norms": [
        ("context_statistics", lambda: norms.context_statistics(jnp.zeros(())))
    ],
}
"""Per module, calls whose arrays break the shapes (or dtypes) that the annotations of the named
function declare."""


def _modules_with_postponed_annotations() -> set[str]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if "from __future__ import annotations" in path.read_text()
    }


def test_every_module_with_postponed_annotations_is_checked() -> None:
    assert _modules_with_postponed_annotations() <= set(WRONG_CALLS)


@pytest.mark.parametrize(
    ("module", "function", "call"),
    [
        pytest.param(module, function, call, id=f"{module}.{function}")
        for module, calls in WRONG_CALLS.items()
        for function, call in calls
    ],
)
def test_a_wrongly_shaped_array_is_a_type_check_error(
    module: str, function: str, call: Callable[[], object]
) -> None:
    where = re.escape(f"checking the parameters of {module}.{function}.")
    with pytest.raises(TypeCheckError, match=where):
        call()


def test_the_same_calls_with_right_shapes_pass() -> None:
    """The errors above come from the shapes alone: a few of the calls, shaped right, return."""
    images = np.zeros((4, 1, 2, 2), np.uint8)
    assert len(sets.evaluation_sets(images, np.zeros(4, np.int64), [0], ns=1)) == 1
    assert layers.patchify(jnp.zeros((1, 4, 4)), 2).shape == (4, 4)
    assert norms.context_statistics(jnp.zeros(3))["debug/context_norm"].shape == ()
    x = gaussian.q_sample(_schedule(), jnp.zeros((2, 3)), jnp.asarray(1), jnp.zeros((2, 3)))
    assert x.shape == (2, 3)
    assert posterior.GaussianPosterior(6, key=KEY)(jnp.zeros(6))[0].shape == (6,)
