"""The FSDM objective through the training step: norms per subtree, context statistics."""

import jax
import jax.numpy as jnp
import numpy as np

from fsdm_eqx import DiffusionConfig
from fsdm_eqx.config import OptimConfig, model_preset
from fsdm_eqx.nn import FSDM
from fsdm_eqx.train import fsdm_loss_fn, init_train_state, make_train_step


def test_fsdm_trains_through_the_step() -> None:
    config = model_preset("smoke")
    diffusion = DiffusionConfig(num_steps=100, sampling_steps=10)
    optim = OptimConfig(lr=1e-3, frozen=("posterior",))
    model = FSDM(config, key=jax.random.key(0))
    state = init_train_state(model, optim, key=jax.random.key(1), total_steps=10)
    step = make_train_step(fsdm_loss_fn(diffusion), optim, total_steps=10)
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, size=(2, config.ns, 3, 32, 32)).astype(np.float32)
    posterior_before = np.asarray(jax.tree_util.tree_leaves(state.model.posterior)[0]).copy()
    for _ in range(2):
        state, metrics = step(state, jnp.asarray(batch))
    values = {k: float(v) for k, v in metrics.items()}
    for name in ("loss", "mse", "vb", "klc", "debug/context_norm", "debug/context_std",
                 "debug/grad_norm_encoder", "debug/grad_norm_denoiser",
                 "debug/param_norm_encoder", "debug/param_norm_denoiser"):  # fmt: skip
        assert np.isfinite(values[name]), name
    assert "debug/grad_norm_posterior" not in values
    assert values["debug/nonfinite"] == 0.0
    np.testing.assert_array_equal(
        np.asarray(jax.tree_util.tree_leaves(state.model.posterior)[0]), posterior_before
    )
