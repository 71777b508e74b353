"""Evaluation mode: `eqx.nn.inference_mode` turns off every source of training noise.

Dropout (encoder and UNet), posterior sampling and null-context dropping all follow one switch:
the evaluation loss of a model with heavy dropout equals the training loss of the same weights
built without any dropout, whatever the dropout key.
"""

import dataclasses

import equinox as eqx
import jax
import numpy as np

from fsdm_eqx.config import DiffusionConfig
from fsdm_eqx.nn import FSDM, UNet
from fsdm_eqx.train import fsdm_loss_fn
from tests.helpers import perturb_zeros, small_unet

NOISY = small_unet(
    unet_attention_resolutions=(),
    unet_dropout=0.9,
    encoder_dropout=0.9,
    null_context_prob=0.5,
    variational=False,
)
QUIET = dataclasses.replace(NOISY, unet_dropout=0.0, encoder_dropout=0.0, null_context_prob=0.0)


def _set(config, key):
    shape = (config.ns, config.channels, config.image_size, config.image_size)
    return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)


def _loss(config):
    diffusion = DiffusionConfig(
        num_steps=100, sampling_steps=10, variance="learned_range", loss="hybrid"
    )
    return eqx.filter_jit(fsdm_loss_fn(diffusion))


def test_evaluation_loss_has_no_dropout_and_no_null_context() -> None:
    noisy = perturb_zeros(FSDM(NOISY, key=jax.random.key(0)))
    assert isinstance(noisy.denoiser, UNet)
    no_dropout = eqx.tree_at(
        lambda m: [leaf for leaf in jax.tree.leaves(m, is_leaf=_is_dropout) if _is_dropout(leaf)],
        noisy,
        replace_fn=lambda _: eqx.nn.Dropout(0.0),
    )
    quiet = eqx.tree_at(
        lambda m: (m.encoder, m.denoiser),
        FSDM(QUIET, key=jax.random.key(0)),
        (no_dropout.encoder, no_dropout.denoiser),
    )
    assert quiet.null_context is None
    x_set = _set(NOISY, jax.random.key(2))
    loss_fn = _loss(NOISY)
    key = jax.random.key(3)

    evaluated, _ = loss_fn(eqx.nn.inference_mode(noisy), x_set, key)
    reference, _ = loss_fn(quiet, x_set, key)
    trained, _ = loss_fn(noisy, x_set, key)
    np.testing.assert_allclose(float(evaluated), float(reference), rtol=1e-5)
    assert abs(float(trained) - float(reference)) > 1e-3 * abs(float(reference))


def test_evaluation_mode_uses_the_posterior_mean(getkey) -> None:
    config = dataclasses.replace(NOISY, variational=True)
    model = perturb_zeros(FSDM(config, key=getkey()))
    x_set = _set(config, getkey())
    evaluated = eqx.nn.inference_mode(model).leave_one_out_context(x_set, key=jax.random.key(4))
    again = eqx.nn.inference_mode(model).leave_one_out_context(x_set, key=jax.random.key(5))
    sampled = model.leave_one_out_context(x_set, key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(evaluated.c), np.asarray(evaluated.mu))
    np.testing.assert_array_equal(np.asarray(evaluated.c), np.asarray(again.c))
    assert not np.allclose(np.asarray(sampled.c), np.asarray(evaluated.c))


def test_an_explicit_argument_overrides_the_mode(getkey) -> None:
    model = perturb_zeros(FSDM(NOISY, key=getkey()))
    x_set = _set(NOISY, getkey())
    key = getkey()
    explicit = model.leave_one_out_context(x_set, key=key, inference=True).c
    by_mode = eqx.nn.inference_mode(model).leave_one_out_context(x_set, key=key).c
    forced_training = (
        eqx.nn.inference_mode(model).leave_one_out_context(x_set, key=key, inference=False).c
    )
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(by_mode))
    assert not np.allclose(np.asarray(forced_training), np.asarray(by_mode))


def _is_dropout(x) -> bool:
    return isinstance(x, eqx.nn.Dropout)
