"""ModelConfig: validation, presets, and the paper configuration's parameter counts."""

import dataclasses

import equinox as eqx
import jax
import pytest
from jaxtyping import TypeCheckError

from fsdm_eqx.config import MODEL_PRESETS, ModelConfig, model_preset
from fsdm_eqx.nn import FSDM, count_parameters

# Parameter counts printed by the reference code (georgosgeorgos/few-shot-diffusion-models,
# VFSDDPM with the vfsddpm_cifar100_vit_film_mean_sigma settings).
REFERENCE_ENCODER, REFERENCE_UNET = 5_702_144, 23_949_702


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(conditioning="lag"), "mean_patch"),
        (dict(pooling="mean_patch"), "mean_patch"),
        (dict(encoder="resnet"), "encoder"),
        (dict(pooling="max"), "pooling"),
        (dict(encoder_patch_size=5), "encoder_patch_size"),
        (dict(dit_patch_size=3), "dit_patch_size"),
        (dict(dit_size=None), "dit_size"),
        (dict(dit_size="XL"), "dit_size"),
        (dict(dit_size=None, dit_hidden=30, dit_depth=2, dit_heads=4), "multiple"),
        (dict(ns=1), "ns"),
        (dict(hdim=0), "hdim"),
        (dict(encoder_depth=2.5), "encoder_depth"),
        (dict(encoder_dropout=1.0), "encoder_dropout"),
        (dict(denoiser="unet", unet_model_channels=48), "multiple of 32"),
    ],
)
def test_invalid_configs_raise_one_clear_error(changes, match):
    # Built without the type-checked __init__: in the tests beartype rejects wrong types and
    # literals at the call, users without it get the ValueError.
    config = object.__new__(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        object.__setattr__(config, field.name, changes.get(field.name, field.default))
    with pytest.raises(ValueError, match=match) as info:
        config.__post_init__()
    assert "ModelConfig" in str(info.value)
    if all(isinstance(v, int | str | None) and not isinstance(v, float) for v in changes.values()):
        with pytest.raises((ValueError, TypeCheckError)):
            ModelConfig(**changes)


def test_presets():
    assert set(MODEL_PRESETS) == {
        "paper-cifar100",
        "vfsddpm_cifar100_vit_film_mean_sigma",
        "vfsddpm_cifar100_vit_lag_meanpatch_sigma",
        "dit-s-cifar100",
        "smoke",
    }
    paper = model_preset("paper-cifar100")
    assert (paper.encoder, paper.pooling, paper.conditioning, paper.denoiser) == (
        "vit",
        "mean",
        "film",
        "unet",
    )
    # The reference's run of this name has a deterministic context ("_sigma": learned variance).
    assert not paper.variational and paper.learned_variance and paper.out_channels == 6
    assert model_preset("vfsddpm_cifar100_vit_film_mean_sigma") == paper
    best = model_preset("vfsddpm_cifar100_vit_lag_meanpatch_sigma")
    assert (best.pooling, best.conditioning, best.variational) == ("mean_patch", "lag", False)
    assert dataclasses.replace(best, pooling="mean", conditioning="film") == paper
    assert (paper.hdim, paper.encoder_depth, paper.encoder_heads, paper.encoder_head_dim) == (
        256,
        6,
        12,
        64,
    )
    dit = model_preset("dit-s-cifar100")
    assert dit.dit_dims == (384, 12, 6) and dit.dit_patch_size == 2
    assert dataclasses.replace(dit, denoiser="unet") == paper
    with pytest.raises(ValueError, match="smoke"):
        model_preset("tiny")


def _reference_vit_count(dim, depth, heads, head_dim, mlp, patch_dim, patches, t_dim):
    """Parameters of the reference ViT (model/vit.py) with its defaults, counted by hand."""
    inner = heads * head_dim
    layer = (
        2 * (2 * dim) + dim * 3 * inner + (inner * dim + dim) + (dim * mlp + mlp + mlp * dim + dim)
    )
    return (
        (patch_dim * dim + dim)  # patch embedding
        + (t_dim * dim + dim)  # timestep embedding projection
        + (patches + 2) * dim  # positions of class, timestep and patch tokens
        + dim  # class token
        + depth * layer
        + (2 * dim + dim * dim + dim)  # LayerNorm + linear head
    )


@pytest.mark.parametrize(
    "name", ["paper-cifar100", "vfsddpm_cifar100_vit_lag_meanpatch_sigma", "dit-s-cifar100"]
)
def test_preset_parameter_counts(name):
    """Counted on abstract shapes (`eqx.filter_eval_shape`): nothing is allocated."""
    config = model_preset(name)
    model = eqx.filter_eval_shape(FSDM, config, key=jax.random.key(0))
    counts = count_parameters(model)
    expected = _reference_vit_count(256, 6, 12, 64, 256, 3 * 8 * 8, 16, 256)
    assert expected == REFERENCE_ENCODER
    assert counts["encoder"] == REFERENCE_ENCODER
    assert counts["posterior"] == 0  # deterministic contexts
    variational = count_parameters(
        eqx.filter_eval_shape(
            FSDM, dataclasses.replace(config, variational=True), key=jax.random.key(0)
        )
    )
    assert variational["posterior"] == (256 * 256 + 256) + (256 * 512 + 512)
    if name == "paper-cifar100":
        assert counts["denoiser"] == REFERENCE_UNET
    elif name == "vfsddpm_cifar100_vit_lag_meanpatch_sigma":
        # LAG replaces FiLM's per-block projections by cross-attention over the 16 patch tokens.
        assert counts["denoiser"] > 0 and counts["null_context"] == 16 * 256
    else:
        d, p = 384, 2
        block = 18 * d * d + 15 * d  # attention 4d^2+4d, MLP 8d^2+5d, adaLN 6d^2+6d
        embed = (p * p * 3 * d + d) + (256 * d + d + d * d + d) + (256 * d + d)
        final = 2 * d * d + 2 * d + d * p * p * 6 + p * p * 6
        assert counts["denoiser"] == embed + 12 * block + final
    print(name, counts)
