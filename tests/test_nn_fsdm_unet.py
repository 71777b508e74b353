"""FSDM with the UNet denoiser: each image's prediction ignores that image through its context."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsdm_eqx.nn import FSDM, UNet
from tests.helpers import perturb_zeros, small_unet

CONFIG = small_unet()


@pytest.mark.parametrize("conditioning", ["film", "lag"])
def test_unet_predictions_are_leave_one_out(conditioning: str, getkey) -> None:
    config = (
        CONFIG
        if conditioning == "film"
        else dataclasses.replace(CONFIG, conditioning="lag", pooling="mean_patch")
    )
    model = perturb_zeros(FSDM(config, key=getkey()))
    assert isinstance(model.denoiser, UNet)
    ns, shape = config.ns, (config.channels, config.image_size, config.image_size)
    x_set = jax.random.uniform(getkey(), (ns, *shape), minval=-1, maxval=1)
    noisy = jax.random.normal(getkey(), (ns, *shape))  # fixed inputs, independent of x_set
    cotangent_key = getkey()
    t = jnp.full((ns,), 500.0)

    @eqx.filter_jit
    def sensitivities(model, x_set):
        def predictions(x):
            c = model.leave_one_out_context(x, inference=True).c
            return jax.vmap(lambda z, ti, ci: model.denoiser(z, ti, ci, inference=True))(
                noisy, t, c
            )

        out, vjp = jax.vjp(predictions, x_set)
        mask = jnp.eye(ns).reshape(ns, ns, 1, 1, 1)
        cotangents = jax.random.normal(cotangent_key, (ns, *out.shape)) * mask
        # One VJP per prediction. (Batching these VJPs with vmap under jit gave wrong values on
        # XLA:CPU with jax 0.10.2, while eager, looped and jitted-grad versions agree.)
        return jnp.stack([vjp(cotangents[i])[0] for i in range(ns)])

    grads = np.asarray(sensitivities(model, x_set))  # grads[i, j] = d(w . eps_i) / d x_j
    for i in range(ns):
        assert np.all(grads[i, i] == 0.0), f"prediction {i} depends on x_{i}"
        assert all(np.abs(grads[i, j]).max() > 0 for j in range(ns) if j != i)
