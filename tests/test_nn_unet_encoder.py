"""The UNet set encoder: the mean of per-image vectors, order-free, counted by hand."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.config import model_preset
from fsdm_eqx.instrument.encoder import collect_visuals
from fsdm_eqx.nn import FSDM, UNetSetEncoder, count_parameters
from tests.helpers import SMALL_UNET_ENCODER, perturb_zeros

SIZE, CH, HDIM = 8, 3, 16
SMALL = dict(
    image_size=SIZE,
    channels=CH,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_channels=32,
    hdim=HDIM,
)


def _encoder(dropout=0.0, seed=0):
    enc = UNetSetEncoder(**SMALL, dropout=dropout, key=jax.random.key(seed))
    return perturb_zeros(enc)  # the zero-initialised output map and residual convs reach out


@pytest.fixture(scope="module")
def x_set():
    return jax.random.uniform(jax.random.key(7), (4, CH, SIZE, SIZE), minval=-1.0, maxval=1.0)


def test_set_context_is_the_mean_of_image_vectors_and_ignores_order(x_set):
    enc = _encoder()
    run = eqx.filter_jit(lambda e, x: e(x, inference=True))
    context = np.asarray(run(enc, x_set))
    assert context.shape == (HDIM,) and context.dtype == np.float32
    per_image = [np.asarray(enc.embed(x, inference=True)) for x in x_set]
    assert np.ptp(np.stack(per_image), axis=0).max() > 1e-3  # the images differ
    np.testing.assert_allclose(context, np.mean(per_image, axis=0), rtol=1e-5, atol=1e-6)
    permuted = np.asarray(run(enc, x_set[jnp.array([3, 1, 0, 2])]))
    np.testing.assert_allclose(permuted, context, rtol=1e-5, atol=1e-6)
    assert run(enc, x_set[:1]).shape == (HDIM,)  # any set size


def test_output_map_starts_at_zero_and_dropout_is_used(x_set):
    raw = UNetSetEncoder(**SMALL, dropout=0.5, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(raw(x_set, inference=True)), np.zeros(HDIM))
    enc = _encoder(dropout=0.5)
    a, b = enc(x_set, key=jax.random.key(1)), enc(x_set, key=jax.random.key(2))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="reads no timestep"):
        enc(x_set, jnp.asarray(3.0), inference=True)


def _conv(cin, cout, k=3):
    return k * k * cin * cout + cout


def _res(cin, cout):
    """GroupNorm, conv3x3, GroupNorm, conv3x3 and a 1x1 skip when the width changes; no FiLM."""
    skip = cin * cout + cout if cin != cout else 0
    return 2 * cin + _conv(cin, cout) + 2 * cout + _conv(cout, cout) + skip


def _attn(c):
    return 2 * c + (c * 3 * c + 3 * c) + (c * c + c)


def test_parameter_count_by_hand():
    enc = UNetSetEncoder(**SMALL, dropout=0.0, key=jax.random.key(0))
    # 8x8: res 32; down; 4x4: res 32->64 + attention; middle res, attention, res; head
    expected = (
        _conv(CH, 32)
        + _res(32, 32)
        + _conv(32, 32)
        + _res(32, 64)
        + _attn(64)
        + 2 * _res(64, 64)
        + _attn(64)
        + 2 * 64
        + (64 * HDIM + HDIM)
    )
    assert sum(count_parameters(enc).values()) == expected


def test_paper_preset_encoder_count_by_hand():
    """The UNet-encoder presets: 64 channels x (1, 2, 3, 4), 2 blocks per level, attention at
    16 and 8, 256-wide context; counted on abstract shapes."""
    model = eqx.filter_eval_shape(
        FSDM, model_preset("vfsddpm_cifar100_unet_film_mean_sigma"), key=jax.random.key(0)
    )
    widths, attends = (64, 128, 192, 256), (False, True, True, False)
    expected, ch = _conv(3, 64), 64
    for level, (width, attend) in enumerate(zip(widths, attends, strict=True)):
        for _ in range(2):
            expected += _res(ch, width) + (_attn(width) if attend else 0)
            ch = width
        if level < 3:
            expected += _conv(ch, ch)
    expected += 2 * _res(256, 256) + _attn(256) + 2 * 256 + (256 * 256 + 256)
    assert count_parameters(model)["encoder"] == expected == 7_822_144


def test_head_channels_must_divide_the_attention_widths():
    with pytest.raises(ValueError, match="head_channels=48"):
        UNetSetEncoder(**{**SMALL, "head_channels": 48}, dropout=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetSetEncoder(
            **{**SMALL, "attention_resolutions": (3,)}, dropout=0.0, key=jax.random.key(0)
        )


def test_model_with_the_unet_encoder_gets_saliency_but_no_attention_views():
    """The training loop's visuals: the UNet encoder has no attention to draw, so a model with
    it gets the context saliency maps and the histograms only."""
    config = dataclasses.replace(
        model_preset("smoke"),
        **SMALL_UNET_ENCODER | dict(unet_attention_resolutions=(8,)),
        image_size=16,
        dit_patch_size=4,
    )
    model = eqx.nn.inference_mode(perturb_zeros(FSDM(config, key=jax.random.key(0))))
    x_sets = jax.random.uniform(jax.random.key(3), (1, 3, 3, 16, 16), minval=-1.0, maxval=1.0)
    visuals = collect_visuals(model, x_sets, layers=(0,), heads=(0,), key=None)
    assert set(visuals.images) == {"encoder/saliency_set0"} and visuals.scalars == {}
    assert {"params/encoder", "params/denoiser"} <= set(visuals.histograms)
