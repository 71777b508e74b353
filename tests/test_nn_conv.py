"""The convolution layer: outputs and gradients equal `eqx.nn.Conv2d`'s, in both formulations.

Every case runs both `impl`s (XLA's convolution and im2col + matmul) and the backend's `auto`
choice, for kernels 1 and 3, strides 1 and 2, padding 0 and 1 and odd image sizes, plain, under
`jax.vmap` and inside `lax.scan` (the samplers' loop), against Equinox's own layer with the same
weights; a bug in the window slicing, the kernel layout, the padding or the stride would show.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from fsdm_eqx.nn import Conv2d, conv2d

CASES = [(1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0), (1, 2, 0), (2, 2, 0)]
IMPLS = ["xla", "im2col", "auto"]


def _pair(kernel, stride, padding, impl):
    conv = Conv2d(5, 7, kernel, stride=stride, padding=padding, impl=impl, key=jax.random.key(0))
    reference = eqx.nn.Conv2d(5, 7, kernel, stride=stride, padding=padding, key=jax.random.key(0))
    return conv, reference


def _loss(layer, x, cotangent):
    return jnp.sum(jax.vmap(layer)(x) * cotangent)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("kernel", "stride", "padding"), CASES)
def test_outputs_and_gradients_equal_equinox(kernel, stride, padding, impl, getkey):
    conv, reference = _pair(kernel, stride, padding, impl)
    np.testing.assert_array_equal(np.asarray(conv.weight), np.asarray(reference.weight))
    assert conv.bias is not None and reference.bias is not None
    np.testing.assert_array_equal(np.asarray(conv.bias), np.asarray(reference.bias))
    x = jax.random.normal(getkey(), (3, 5, 9, 7))  # odd, non-square sizes
    want = jax.vmap(reference)(x)
    got = jax.vmap(conv)(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(getkey(), want.shape)
    grads = jax.grad(_loss, argnums=(0, 1))(conv, x, cotangent)
    ref_grads = jax.grad(_loss, argnums=(0, 1))(reference, x, cotangent)
    for a, b in [(grads[1], ref_grads[1]), (grads[0].weight, ref_grads[0].weight),
                 (grads[0].bias, ref_grads[0].bias)]:  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_inside_scan_and_channels_last(impl, getkey):
    """Three convolutions in a `lax.scan` (as a sampler's loop), and the channels-last entry
    point the UNet uses, against the channels-first reference."""
    conv, reference = _pair(3, 1, 1, impl)
    conv = eqx.tree_at(lambda c: c.weight, conv, conv.weight[:5])  # 5 -> 5 channels
    reference = eqx.tree_at(lambda c: c.weight, reference, reference.weight[:5])
    conv = eqx.tree_at(lambda c: c.bias, conv, conv.bias[:5])
    reference = eqx.tree_at(lambda c: c.bias, reference, reference.bias[:5])
    x = jax.random.normal(getkey(), (5, 7, 7))

    def run(layer):
        def body(h, _):
            return jnp.tanh(layer(h)), None

        return jax.lax.scan(body, x, None, length=3)[0]

    want = run(reference)
    np.testing.assert_allclose(np.asarray(jax.jit(run)(conv)), np.asarray(want), atol=1e-5)
    last = conv.channels_last(jnp.moveaxis(x, 0, -1))
    np.testing.assert_allclose(np.moveaxis(np.asarray(last), -1, 0), reference(x), atol=1e-5)


def test_conv2d_matches_numpy_cross_correlation():
    """The functional form against a direct numpy loop over output pixels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 2)).astype(np.float32)
    k = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    want = np.zeros((3, 3, 4), np.float32)
    for i in range(3):
        for j in range(3):
            window = padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
            want[i, j] = np.einsum("hwc,hwco->o", window, k)
    for impl in ("xla", "im2col"):
        got = conv2d(jnp.asarray(x), jnp.asarray(k), stride=2, padding=1, impl=impl)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_one_clear_error(getkey):
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(3, 4, 0, key=getkey())
    with pytest.raises((ValueError, TypeCheckError), match=r"channels|cin"):
        conv2d(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 2, 4)))
