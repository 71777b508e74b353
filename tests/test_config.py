"""Configs: one ValueError naming the field, the value and what is allowed; defaults and presets.

Every constraint is declared once, in a field's annotation, and checked by `check_fields`; the
tables below hold one bad value per constrained field, so a constraint dropped from an annotation,
or a config that stops calling the validator, fails a test.
"""

import dataclasses
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import annotated_types as at
import equinox as eqx
import pytest

import fsdm_eqx
from fsdm_eqx import DiffusionConfig
from fsdm_eqx.config import (
    MODEL_PRESETS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    check_value,
    model_preset,
)
from fsdm_eqx.nn import FSDM, count_parameters
from fsdm_eqx.sample import SampleConfig

# Parameter counts printed by the reference code (georgosgeorgos/few-shot-diffusion-models,
# VFSDDPM with the vfsddpm_cifar100_vit_film_mean_sigma settings).
REFERENCE_ENCODER, REFERENCE_UNET = 5_702_144, 23_949_702


def _build(cls: type, **changes: Any) -> object:
    """The config ``cls`` with its defaults (and the required paths of `SampleConfig`) changed."""
    required = {"checkpoint": "run", "support_dir": "support"} if cls is SampleConfig else {}
    return cls(**{**required, **changes})


# ---------------------------------------------------------------------------------------------
# bad values: the message names the config, the field, the value and what is allowed


BAD_VALUES: list[tuple[type, dict[str, Any], str]] = [
    (
        DiffusionConfig,
        {"schedule": "quadratic"},
        r"DiffusionConfig.schedule='quadratic' .*'linear', 'cosine'",
    ),
    (DiffusionConfig, {"variance": "big"}, r"DiffusionConfig.variance='big' .*'fixed_small'"),
    (DiffusionConfig, {"loss": "l1"}, r"DiffusionConfig.loss='l1' .*'mse', 'hybrid'"),
    (
        DiffusionConfig,
        {"sampler": "euler"},
        r"DiffusionConfig.sampler='euler' .*'ddpm', 'ddim', 'ode'",
    ),
    (DiffusionConfig, {"num_steps": 1}, r"DiffusionConfig.num_steps=1 .*\[2, inf\]"),
    (
        DiffusionConfig,
        {"sampling_steps": 2000},
        r"DiffusionConfig.sampling_steps=2000 .*\[1, 1000\]",
    ),
    (DiffusionConfig, {"ddim_eta": 1.5}, r"DiffusionConfig.ddim_eta=1.5 .*\[0.0, 1.0\]"),
    (DiffusionConfig, {"ode_rtol": 0.0}, r"DiffusionConfig.ode_rtol=0.0 .*\(0.0, inf\]"),
    (
        DiffusionConfig,
        {"num_steps": 100.5, "sampling_steps": 10},
        r"DiffusionConfig.num_steps=100.5 .*integer",
    ),
    (
        DiffusionConfig,
        {"variance": "fixed_small"},
        r"loss='hybrid' is not allowed with variance='fixed_small'",
    ),
    (DiffusionConfig, {"loss": "mse"}, r"variance='learned_range' is not allowed with loss='mse'"),
    (OptimConfig, {"lr": 0.0}, r"OptimConfig.lr=0.0 .*\(0.0, inf\]"),
    (
        OptimConfig,
        {"lr_schedule": "linear"},
        r"OptimConfig.lr_schedule='linear' .*'constant', 'cosine', 'step', 'plateau'",
    ),
    (
        OptimConfig,
        {"precision": "float16"},
        r"OptimConfig.precision='float16' .*'float32', 'bfloat16'",
    ),
    (OptimConfig, {"ema_decay": 1.5}, r"OptimConfig.ema_decay=1.5"),
    (OptimConfig, {"lr_multipliers": (("encoder", 0.0),)}, r"factors must be > 0"),
    (
        OptimConfig,
        {"lr_multipliers": (("encoder", 2.0),), "frozen": ("encoder",)},
        r"name a subtree twice",
    ),
    (DataConfig, {"ns": 0}, r"DataConfig.ns=0 is not allowed; it must lie in \[1"),
    (DataConfig, {"prefetch": -1}, "DataConfig.prefetch=-1"),
    (DataConfig, {"workers": 0}, "DataConfig.workers=0"),
    (DataConfig, {"image_size": 28}, "DataConfig.image_size=28 is not allowed; choose one of 32"),
    (DataConfig, {"dataset": "mnist", "image_size": 28}, "FC100 splits CIFAR-100"),
    (
        DataConfig,
        {"dataset": "mnist", "image_size": 28, "class_split": "background_evaluation"},
        "Omniglot's split",
    ),
    (
        DataConfig,
        {"dataset": "omniglot", "omniglot_subsets": ("background", "nope")},
        "omniglot_subsets holds 'nope'",
    ),
    (DataConfig, {"dataset": "omniglot", "omniglot_subsets": ()}, "omniglot_subsets is empty"),
    (DataConfig, {"dataset": "imagenet"}, r"\.dataset='imagenet' is not allowed; choose one of"),
    (DataConfig, {"split": "dev"}, r"\.split='dev' is not allowed; choose one of 'train'"),
    (
        DataConfig,
        {"class_split": "tiered"},
        r"\.class_split='tiered' is not allowed; choose one of",
    ),
    (
        DataConfig,
        {"batch_size": 2.5},
        r"DataConfig\.batch_size=2\.5 is not allowed; it must be an integer",
    ),
    (ModelConfig, {"conditioning": "lag"}, "mean_patch"),
    (ModelConfig, {"pooling": "mean_patch"}, "mean_patch"),
    (ModelConfig, {"pooling": "agg"}, r"pooling='agg'; LAG attends to context tokens"),
    (ModelConfig, {"pooling": "none"}, r"pooling='none'; LAG"),
    (
        ModelConfig,
        {"encoder": "unet", "pooling": "cls"},
        r"encoder='unet' is not allowed with pool",
    ),
    (
        ModelConfig,
        {"encoder": "unet", "conditioning": "lag", "pooling": "mean_patch"},
        r"encoder='unet' is not allowed with pooling='mean_patch'",
    ),
    (ModelConfig, {"encoder": "unet", "encoder_time_token": True}, "reads no timestep"),
    (ModelConfig, {"encoder": "unet", "unet_model_channels": 48}, "multiple of 32"),
    (ModelConfig, {"encoder": "resnet"}, "encoder"),
    (ModelConfig, {"pooling": "max"}, "pooling"),
    (ModelConfig, {"encoder_patch_size": 5}, "encoder_patch_size"),
    (ModelConfig, {"dit_patch_size": 3}, "dit_patch_size"),
    (ModelConfig, {"dit_size": None}, "dit_size"),
    (ModelConfig, {"dit_size": "XL"}, "dit_size"),
    (ModelConfig, {"dit_size": None, "dit_hidden": 30, "dit_depth": 2, "dit_heads": 4}, "multiple"),
    (ModelConfig, {"ns": 1}, "ns"),
    (ModelConfig, {"hdim": 0}, "hdim"),
    (ModelConfig, {"encoder_depth": 2.5}, "encoder_depth"),
    (ModelConfig, {"encoder_dropout": 1.0}, "encoder_dropout"),
    (ModelConfig, {"denoiser": "unet", "unet_model_channels": 48}, "multiple of 32"),
]


@pytest.mark.parametrize(
    ("cls", "changes", "pattern"),
    BAD_VALUES,
    ids=[f"{cls.__name__}-{'-'.join(changes)}" for cls, changes, _ in BAD_VALUES],
)
def test_bad_values_raise_one_clear_error(cls: type, changes: dict[str, Any], pattern: str) -> None:
    # The configs are exempt from the tests' run-time type checker, so a wrong type reaches the
    # validator as it does for users.
    with pytest.raises(ValueError, match=pattern) as info:
        _build(cls, **changes)
    assert str(info.value).startswith(cls.__name__)


ONE_BAD_VALUE: dict[type, dict[str, Any]] = {
    DiffusionConfig: {
        "num_steps": 1, "schedule": "quadratic", "variance": "big", "loss": "l1",
        "vlb_weight": -1.0, "sampling_steps": 0, "sampler": "euler", "ddim_eta": 1.5,
        "ode_rtol": 0.0, "ode_atol": 0.0, "ode_max_steps": 0, "guidance_scale": -1.0,
    },
    OptimConfig: {
        "lr": 0.0, "weight_decay": -1.0, "b1": 1.0, "b2": -0.1, "eps": -1.0, "grad_clip": -1.0,
        "warmup_steps": -1, "lr_schedule": "linear", "lr_decay_factor": 0.0,
        "lr_decay_every": 0, "plateau_window": 0, "plateau_patience": 0, "ema_decay": 1.5,
        "ema_start": -1, "ema_every": 0, "precision": "float16",
    },
    DataConfig: {
        "dataset": "imagenet", "omniglot_subsets": (), "class_split": "tiered", "split_seed": -1,
        "split": "dev", "ns": 0, "batch_size": 0, "image_size": 0, "prefetch": -1, "workers": 0,
        "seed": -1,
    },
    ModelConfig: {
        "encoder": "resnet", "pooling": "max", "conditioning": "cross", "hdim": 0,
        "encoder_depth": 0, "encoder_heads": 0, "encoder_head_dim": 0, "encoder_mlp_dim": 0,
        "encoder_dropout": 1.0, "encoder_patch_size": 0, "denoiser": "vae", "dit_size": "XL",
        "dit_hidden": 0, "dit_depth": 0, "dit_heads": 0, "dit_patch_size": 0, "image_size": 0,
        "channels": 0, "ns": 1, "unet_model_channels": 0, "unet_channel_mult": (1, 0),
        "unet_num_res_blocks": 0, "unet_attention_resolutions": (0,), "unet_num_heads": 0,
        "unet_dropout": -0.1, "null_context_prob": 1.0,
    },
    EvalConfig: {
        "num_sets": 0, "ns": 1, "samples_per_set": 0, "sampler": "euler", "sampling_steps": 0,
        "seed": -1, "generate_batch_size": 0, "feature_batch_size": 0, "kid_subset_size": 1,
        "kid_num_subsets": 0, "pr_neighbours": 0, "eval_split": "dev", "likelihood_sets": 0,
        "likelihood_steps": 0, "likelihood_batch_size": 0, "probe_episodes": 0,
        "probe_queries_per_class": 0, "curve_sets": 0, "curve_sampler": "euler",
        "curve_sampling_steps": 0,
    },
    RunConfig: {
        "run_dir": "", "num_steps": 0, "log_every": 0, "eval_every": -1, "save_every": -1,
        "keep_checkpoints": 0, "seed": -1, "fid_every": -1, "early_stopping_patience": -1,
        "early_stopping_min_delta": -0.1, "sample_every": -1,
        "wandb": "cloud", "wandb_project": "", "wandb_entity": "", "wandb_init_timeout": 0.0,
    },
    SampleConfig: {
        "num": 0, "sampler": "euler", "steps": 0, "guidance_scale": -1.0, "batch_size": 0,
        "columns": 0, "seed": -1,
    },
}  # fmt: skip


def _is_constrained(hint: object) -> bool:
    """Whether an annotation allows less than its type: a ``Literal`` or a bound."""
    if get_origin(hint) is Literal:
        return True
    if get_origin(hint) is Annotated:
        metadata = hint.__metadata__  # type: ignore[attr-defined]
        if any(isinstance(m, at.BaseMetadata | at.GroupedMetadata) for m in metadata):
            return True
    return any(_is_constrained(arg) for arg in get_args(hint))


@pytest.mark.parametrize("cls", list(ONE_BAD_VALUE), ids=lambda cls: cls.__name__)
def test_every_constrained_field_has_a_bad_value(cls: type) -> None:
    hints = get_type_hints(cls, include_extras=True)
    constrained = {f.name for f in dataclasses.fields(cls) if _is_constrained(hints[f.name])}
    assert set(ONE_BAD_VALUE[cls]) == constrained


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [(cls, field, value) for cls, bad in ONE_BAD_VALUE.items() for field, value in bad.items()],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_the_validator_checks_every_constrained_field(cls: type, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field}[= ]"):
        _build(cls, **{field: value})


def test_an_unknown_constraint_is_an_error_not_a_pass() -> None:
    with pytest.raises(TypeError, match="MultipleOf"):
        check_value("x", 3, Annotated[int, at.MultipleOf(2)])


def test_optional_and_tuple_fields() -> None:
    RunConfig(wandb_entity="team")
    EvalConfig(likelihood_steps=5)
    with pytest.raises(ValueError, match=r"likelihood_steps=2.5 .*integer, or be None"):
        EvalConfig(likelihood_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unet_channel_mult holds 0, .*\[1, inf\]"):
        ModelConfig(unet_channel_mult=(1, 0))
    with pytest.raises(ValueError, match=r"RunConfig.progress=1 .*True or False"):
        RunConfig(progress=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# defaults, valid combinations and presets


def test_diffusion_config_defaults_follow_the_reference() -> None:
    config = DiffusionConfig()
    assert (config.num_steps, config.schedule, config.variance, config.loss) == (
        1000,
        "linear",
        "learned_range",
        "hybrid",
    )
    assert config.learned_variance
    assert not DiffusionConfig(variance="fixed_large", loss="mse").learned_variance
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_steps = 10  # type: ignore[misc]


def test_data_config_defaults_are_the_paper_cifar_setting() -> None:
    config = DataConfig()
    assert (config.dataset, config.class_split, config.ns, config.image_size) == (
        "cifar100", "fc100", 6, 32,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ns = 3  # type: ignore[misc]
    assert fsdm_eqx.DataConfig is DataConfig


def test_valid_data_combinations() -> None:
    DataConfig(dataset="omniglot", class_split="background_evaluation", image_size=28)
    DataConfig(dataset="omniglot", class_split="random", image_size=32, split="val")
    DataConfig(dataset="mnist", class_split="random", image_size=28, flips=True)


def _from_run_name(name: str) -> dict[str, Any]:
    """The settings a reference run's name spells out,
    ``vfsddpm_cifar100_<encoder>_<conditioning>_<pooling>_<context>`` (context `sigma`:
    deterministic with a learned variance, `vi`: variational)."""
    _, _, encoder, conditioning, pooling, context = name.split("_")
    encoders = {"vit": "vit", "vitset": "svit", "unet": "unet"}
    settings: dict[str, Any] = {
        "encoder": encoders[encoder],
        "conditioning": conditioning,
        "pooling": {"meanpatch": "mean_patch"}.get(pooling, pooling),
        "variational": context == "vi",
    }
    if encoder == "unet":
        settings["encoder_time_token"] = False  # the image-level encoder reads no timestep
    return settings


def test_presets() -> None:
    assert set(MODEL_PRESETS) == {
        "paper-cifar100",
        "vfsddpm_cifar100_vit_film_mean_sigma",
        "vfsddpm_cifar100_vit_lag_meanpatch_sigma",
        "vfsddpm_cifar100_vit_lag_agg_sigma",
        "vfsddpm_cifar100_vit_lag_none_sigma",
        "vfsddpm_cifar100_vitset_lag_none_sigma",
        "vfsddpm_cifar100_unet_film_mean_sigma",
        "vfsddpm_cifar100_unet_film_mean_vi",
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
    # The reference's runs differ from it in exactly the parts their names give.
    reference_runs = [name for name in MODEL_PRESETS if name.startswith("vfsddpm_")]
    assert len(reference_runs) == 7
    for name in reference_runs:
        assert model_preset(name) == dataclasses.replace(paper, **_from_run_name(name)), name
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
def test_preset_parameter_counts(name, getkey):
    """Counted on abstract shapes (`eqx.filter_eval_shape`): nothing is allocated."""
    config = model_preset(name)
    model = eqx.filter_eval_shape(FSDM, config, key=getkey())
    counts = count_parameters(model)
    expected = _reference_vit_count(256, 6, 12, 64, 256, 3 * 8 * 8, 16, 256)
    assert expected == REFERENCE_ENCODER
    assert counts["encoder"] == REFERENCE_ENCODER
    assert counts["posterior"] == 0  # deterministic contexts
    variational = count_parameters(
        eqx.filter_eval_shape(FSDM, dataclasses.replace(config, variational=True), key=getkey())
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
