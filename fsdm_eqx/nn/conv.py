"""Two-dimensional convolution, channels-last, in the formulation each backend runs fastest.

Two formulations compute the same function with the same parameters:

- `xla`: `lax.conv_general_dilated` in NHWC/HWIO. On GPU this is cuDNN. On CPU, jaxlib 0.10's
  XLA:CPU runs channels-last convolutions through YNNPACK, faster on the UNet's 3x3 shapes than
  the same convolution written as im2col: the copies of the shifted views cost more than the
  matmul saves (README, "Benchmarks"). Channels-first convolutions inside a loop, the slow case,
  are avoided by keeping networks channels-last (`Conv2d.channels_last`).
- `im2col`: the ``kh * kw`` shifted (and strided) views of the zero-padded image stacked on the
  channel axis and contracted with the kernel in one matmul. When the windows tile the image
  (``stride == kernel``, no padding: patch embeddings) the views are a reshape, with no copy, and
  this is what `auto` uses on CPU.

`auto` (the default) picks per call from the backend and the kernel's shape.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

ConvImpl = Literal["auto", "xla", "im2col"]
"""`xla`: `lax.conv_general_dilated`; `im2col`: shifted views and one matmul; `auto`: im2col for
non-overlapping windows on CPU, XLA's convolution otherwise (decided when the computation is
traced)."""


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _im2col(
    x: Float[Array, "h w cin"], kernel: Float[Array, "kh kw cin cout"], stride: int, padding: int
) -> Float[Array, "h2 w2 cout"]:
    kh, kw, cin, cout = kernel.shape
    h, w, _ = x.shape
    ho, wo = _output_size(h, kh, stride, padding), _output_size(w, kw, stride, padding)
    if padding:
        x = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)))
    if stride == kh == kw:
        # Non-overlapping windows: a reshape, no copy of shifted views.
        cols = x[: ho * kh, : wo * kw].reshape(ho, kh, wo, kw, cin).transpose(0, 2, 1, 3, 4)
    else:
        views = [
            x[i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            for i in range(kh)
            for j in range(kw)
        ]
        cols = jnp.stack(views, axis=2)
    cols = cols.reshape(ho, wo, kh * kw * cin)
    return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout), preferred_element_type=x.dtype)


def _xla(
    x: Float[Array, "h w cin"], kernel: Float[Array, "kh kw cin cout"], stride: int, padding: int
) -> Float[Array, "h2 w2 cout"]:
    return jax.lax.conv_general_dilated(
        x[None],
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )[0]


def conv2d(
    x: Float[Array, "h w cin"],
    kernel: Float[Array, "kh kw cin cout"],
    *,
    stride: int = 1,
    padding: int = 0,
    impl: ConvImpl = "auto",
) -> Float[Array, "h2 w2 cout"]:
    """Cross-correlate one channels-last image with a kernel (no bias), zero-padded.

    **Arguments:**
    - `x`: the image, `(height, width, in_channels)`.
    - `kernel`: the kernel, `(kernel_h, kernel_w, in_channels, out_channels)`.
    - `stride`: the step between windows, along both axes.
    - `padding`: zeros added on every side.
    - `impl`: the formulation (see `ConvImpl`); every choice computes the same function.

    **Returns:** `(h2, w2, out_channels)` with `h2 = (h + 2 padding - kernel_h) // stride + 1`.
    """
    if impl == "auto":
        kh, kw = kernel.shape[:2]
        windows_tile = kh == kw == stride and padding == 0
        impl = "im2col" if windows_tile and jax.default_backend() == "cpu" else "xla"
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d: the image has {x.shape[-1]} channels but the kernel expects "
            f"{kernel.shape[2]}."
        )
    fn = _im2col if impl == "im2col" else _xla
    return fn(x, kernel.astype(x.dtype), stride, padding)


class Conv2d(eqx.Module):
    """A 2D convolution layer with the parameters of `eqx.nn.Conv2d`, computed by `conv2d`.

    The weight keeps `eqx.nn.Conv2d`'s `(out, in, kh, kw)` layout and initialisation, so
    checkpoints and reference weights carry over; the image is channels-first at the interface
    and channels-last inside.
    """

    weight: Float[Array, "cout cin kh kw"]
    bias: Float[Array, "cout 1 1"] | None
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)
    impl: ConvImpl = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        impl: ConvImpl = "auto",
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `in_channels`, `out_channels`: the channels in and out.
        - `kernel_size`: side of the square kernel.
        - `stride`, `padding`: as in `conv2d`.
        - `use_bias`: whether a bias is added.
        - `impl`: the formulation, `auto` unless comparing them.
        - `key`: initialisation randomness; the weights are those `eqx.nn.Conv2d` draws from it.
        """
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("kernel_size", kernel_size, 1),
            ("stride", stride, 1),
            ("padding", padding, 0),
        ):
            if value < low:
                raise ValueError(
                    f"Conv2d {name}={value!r} is not allowed; it must be an int >= {low}."
                )
        reference = eqx.nn.Conv2d(
            in_channels, out_channels, kernel_size, use_bias=use_bias, key=key
        )
        self.weight = reference.weight
        self.bias = reference.bias
        self.stride = stride
        self.padding = padding
        self.impl = impl

    def channels_last(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        """Convolve one channels-last image (the layout networks should keep inside)."""
        kernel = jnp.transpose(self.weight, (2, 3, 1, 0))
        y = conv2d(x, kernel, stride=self.stride, padding=self.padding, impl=self.impl)
        return y if self.bias is None else y + self.bias[:, 0, 0].astype(y.dtype)[None, None]

    def __call__(
        self, x: Float[Array, "cin h w"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "cout h2 w2"]:
        """Convolve one channels-first image; `key` is unused (the `eqx.nn.Conv2d` signature)."""
        del key
        return jnp.moveaxis(self.channels_last(jnp.moveaxis(x, 0, -1)), -1, 0)
