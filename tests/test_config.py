"""Configs refuse bad values with one ValueError naming the field, the value and what is allowed."""

import dataclasses

import pytest

from fsdm_eqx import DiffusionConfig
from fsdm_eqx.config import OptimConfig


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"schedule": "quadratic"}, r"DiffusionConfig.schedule='quadratic' .*'linear', 'cosine'"),
        ({"variance": "big"}, r"DiffusionConfig.variance='big' .*'fixed_small'"),
        ({"loss": "l1"}, r"DiffusionConfig.loss='l1' .*'mse', 'hybrid'"),
        ({"sampler": "euler"}, r"DiffusionConfig.sampler='euler' .*'ddpm', 'ddim', 'ode'"),
        ({"num_steps": 1}, r"DiffusionConfig.num_steps=1 .*\[2, inf\]"),
        ({"sampling_steps": 2000}, r"DiffusionConfig.sampling_steps=2000 .*\[1, 1000\]"),
        ({"ddim_eta": 1.5}, r"DiffusionConfig.ddim_eta=1.5 .*\[0.0, 1.0\]"),
        ({"ode_rtol": 0.0}, r"DiffusionConfig.ode_rtol=0.0 .*\(0.0, inf\]"),
        ({"num_steps": 100.5, "sampling_steps": 10}, r"DiffusionConfig.num_steps=100.5 .*integer"),
        ({"variance": "fixed_small"}, r"loss='hybrid' is not allowed with variance='fixed_small'"),
        ({"loss": "mse"}, r"variance='learned_range' is not allowed with loss='mse'"),
    ],
)
def test_diffusion_config_rejects_bad_values(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DiffusionConfig(**kwargs)


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


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lr": 0.0}, r"OptimConfig.lr=0.0 .*\(0.0, inf\]"),
        ({"lr_schedule": "linear"}, r"OptimConfig.lr_schedule='linear' .*'constant', 'cosine'"),
        ({"lr_decay_factor": 1.5}, r"OptimConfig.lr_decay_factor=1.5"),
        ({"plateau_window": 0}, r"OptimConfig.plateau_window=0"),
        ({"precision": "float16"}, r"OptimConfig.precision='float16' .*'float32', 'bfloat16'"),
        ({"ema_decay": 1.5}, r"OptimConfig.ema_decay=1.5"),
        ({"lr_multipliers": (("encoder", 0.0),)}, r"factors must be > 0"),
        ({"lr_multipliers": (("encoder", 2.0),), "frozen": ("encoder",)}, r"name a subtree twice"),
    ],
)
def test_optim_config_rejects_bad_values(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        OptimConfig(**kwargs)
