"""The FID InceptionV3 (TensorFlow "inception-2015-12-05" weights, pool3, 2048-d) in Equinox.

The network is pytorch-fid's ``FIDInceptionV3``, which reproduces the TensorFlow graph used by every
FID evaluator: torchvision's InceptionV3 topology without the auxiliary head, with batch norm
eps 1e-3, average pooling that excludes padding (``count_include_pad=False``) in the A, C and first
E blocks, and max pooling in the branch pool of the last E block (``Mixed_7c``). The output is the
global average pool of ``Mixed_7c`` (the TF graph's ``pool_3``).

Input conventions (both documented by the evaluators that use them):

- ``"tf1"`` (default): the TensorFlow reference evaluator used by the FSDM paper, ADM and DiT. The
  uint8 image, as float, is resized to 299x299 with TF1's bilinear resize *without* half-pixel
  centres (``align_corners=False``, ``half_pixel_centers=False``: source index ``dst * in / out``),
  then scaled as ``(x - 128) / 128``. torch-fidelity and clean-fid's ``legacy_tensorflow`` mode
  emulate exactly this.
- ``"pytorch_fid"``: pytorch-fid. The image is scaled to [0, 1] (``x / 255``), resized with torch's
  bilinear interpolation (``align_corners=False``, half-pixel centres: source index
  ``(dst + 0.5) * in / out - 0.5``, clamped at 0, no antialiasing), then scaled as ``2 x - 1``.

At 299x299 input both resizes are the identity, so the conventions differ only in the scaling
(``(x - 128) / 128`` vs ``2 x / 255 - 1``). Neither matches ``jax.image.resize``, which uses
half-pixel centres and antialiases when downsampling.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped, UInt8

from ..batching import map_in_batches
from ..sharding import batch_sharding, make_mesh, replicated_sharding
from ._inception_weights import InceptionWeightsError, fetch_weights, read_weights

InputConvention = Literal["tf1", "pytorch_fid"]

INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPS = 1e-3
# Layout of activations inside the network: channels-last, which compiles and runs faster than
# channels-first on XLA:CPU.
_DIMS = ("NHWC", "HWIO", "NHWC")

# --------------------------------------------------------------------------- architecture

# (name, in, out, kernel (h, w), stride, padding (h, w)) for every conv of the network, in the
# order of the forward pass; the weights are validated against it.
_ConvSpec = tuple[str, int, int, tuple[int, int], int, tuple[int, int]]


def _block_a(name: str, cin: int, pool: int) -> list[_ConvSpec]:
    return [
        (f"{name}.branch1x1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{name}.branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
        (f"{name}.branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
        (f"{name}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{name}.branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
        (f"{name}.branch_pool", cin, pool, (1, 1), 1, (0, 0)),
    ]


def _block_b(name: str, cin: int) -> list[_ConvSpec]:
    return [
        (f"{name}.branch3x3", cin, 384, (3, 3), 2, (0, 0)),
        (f"{name}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{name}.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]


def _block_c(name: str, c7: int) -> list[_ConvSpec]:
    return [
        (f"{name}.branch1x1", 768, 192, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7_1", 768, c7, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
        (f"{name}.branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7dbl_1", 768, c7, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
        (f"{name}.branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
        (f"{name}.branch_pool", 768, 192, (1, 1), 1, (0, 0)),
    ]


def _block_d(name: str) -> list[_ConvSpec]:
    return [
        (f"{name}.branch3x3_1", 768, 192, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        (f"{name}.branch7x7x3_1", 768, 192, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        (f"{name}.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]


def _block_e(name: str, cin: int) -> list[_ConvSpec]:
    return [
        (f"{name}.branch1x1", cin, 320, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{name}.branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{name}.branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
        (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{name}.branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


ARCHITECTURE: tuple[_ConvSpec, ...] = (
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
    *_block_a("Mixed_5b", 192, 32),
    *_block_a("Mixed_5c", 256, 64),
    *_block_a("Mixed_5d", 288, 64),
    *_block_b("Mixed_6a", 288),
    *_block_c("Mixed_6b", 128),
    *_block_c("Mixed_6c", 160),
    *_block_c("Mixed_6d", 160),
    *_block_c("Mixed_6e", 192),
    *_block_d("Mixed_7a"),
    *_block_e("Mixed_7b", 1280),
    *_block_e("Mixed_7c", 2048),
)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every array name of the npz layout with its shape (conv weights in OIHW)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, (kh, kw), _, _ in ARCHITECTURE:
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)
    return shapes


def validate_weights(weights: Mapping[str, np.ndarray], source: str = "the weights") -> None:
    """Raise `InceptionWeightsError` unless ``weights`` hold every array of the network."""
    for key, shape in expected_shapes().items():
        if key not in weights:
            raise InceptionWeightsError(
                f"{source} lack {key}, so they are not the FID Inception (pytorch-fid's "
                "pt_inception-2015-12-05) weights; pass that file or omit inception_weights."
            )
        if tuple(weights[key].shape) != shape:
            raise InceptionWeightsError(
                f"{source} hold {key} with shape {tuple(weights[key].shape)}, not {shape}, so "
                "they are not the FID Inception (pt_inception-2015-12-05) weights; pass that file "
                "or omit inception_weights."
            )


# --------------------------------------------------------------------------- layers


class ConvBN(eqx.Module):
    """Convolution without bias, inference batch norm (eps 1e-3) and ReLU, as ``BasicConv2d``."""

    kernel: Float[Array, "kh kw cin cout"]
    scale: Float[Array, " cout"]
    shift: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: tuple[tuple[int, int], tuple[int, int]] = eqx.field(static=True)

    def __init__(self, weights: Mapping[str, np.ndarray], spec: _ConvSpec):
        name, _, _, _, stride, (ph, pw) = spec
        w = np.asarray(weights[f"{name}.conv.weight"], np.float32)
        gamma = np.asarray(weights[f"{name}.bn.weight"], np.float32)
        beta = np.asarray(weights[f"{name}.bn.bias"], np.float32)
        mean = np.asarray(weights[f"{name}.bn.running_mean"], np.float32)
        var = np.asarray(weights[f"{name}.bn.running_var"], np.float32)
        scale = gamma / np.sqrt(var + np.float32(_BN_EPS))
        self.kernel = jnp.asarray(np.transpose(w, (2, 3, 1, 0)))
        self.scale = jnp.asarray(scale)
        self.shift = jnp.asarray(beta - mean * scale)
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        y = jax.lax.conv_general_dilated(
            x[None],
            self.kernel,
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=_DIMS,
        )[0]
        return jax.nn.relu(y * self.scale[None, None, :] + self.shift[None, None, :])


def _max_pool(x: Float[Array, "h w c"], size: int, stride: int, pad: int) -> Float[Array, "..."]:
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (size, size, 1),
        (stride, stride, 1),
        ((pad, pad), (pad, pad), (0, 0)),
    )


def _avg_pool_3x3_exclude_pad(x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    """3x3 average pool, stride 1, padding 1, dividing by the number of real pixels."""
    h, w, _ = x.shape
    window, strides, pads = (3, 3, 1), (1, 1, 1), ((1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    count = np.outer(rows, cols).astype(np.float32)[:, :, None]
    return total / jnp.asarray(count)


def _convs(weights: Mapping[str, np.ndarray], block: str) -> dict[str, ConvBN]:
    prefix = block + "."
    return {
        spec[0][len(prefix) :]: ConvBN(weights, spec)
        for spec in ARCHITECTURE
        if spec[0].startswith(prefix)
    }


class InceptionA(eqx.Module):
    """pytorch-fid's ``FIDInceptionA``: 1x1, 5x5, double 3x3 and average-pool branches."""

    convs: dict[str, ConvBN]

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c2"]:
        c = self.convs
        b1 = c["branch1x1"](x)
        b5 = c["branch5x5_2"](c["branch5x5_1"](x))
        b3 = c["branch3x3dbl_3"](c["branch3x3dbl_2"](c["branch3x3dbl_1"](x)))
        bp = c["branch_pool"](_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(eqx.Module):
    """torchvision's ``InceptionB`` (grid reduction 35 -> 17)."""

    convs: dict[str, ConvBN]

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c2"]:
        c = self.convs
        b3 = c["branch3x3"](x)
        bd = c["branch3x3dbl_3"](c["branch3x3dbl_2"](c["branch3x3dbl_1"](x)))
        return jnp.concatenate([b3, bd, _max_pool(x, 3, 2, 0)], axis=-1)


class InceptionC(eqx.Module):
    """pytorch-fid's ``FIDInceptionC``: factorised 7x7 branches and an average-pool branch."""

    convs: dict[str, ConvBN]

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c2"]:
        c = self.convs
        b1 = c["branch1x1"](x)
        b7 = c["branch7x7_3"](c["branch7x7_2"](c["branch7x7_1"](x)))
        bd = x
        for i in range(1, 6):
            bd = c[f"branch7x7dbl_{i}"](bd)
        bp = c["branch_pool"](_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(eqx.Module):
    """torchvision's ``InceptionD`` (grid reduction 17 -> 8)."""

    convs: dict[str, ConvBN]

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c2"]:
        c = self.convs
        b3 = c["branch3x3_2"](c["branch3x3_1"](x))
        b7 = x
        for i in range(1, 5):
            b7 = c[f"branch7x7x3_{i}"](b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 3, 2, 0)], axis=-1)


class InceptionE(eqx.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (average pool) or ``FIDInceptionE_2`` (max pool)."""

    convs: dict[str, ConvBN]
    max_pool: bool = eqx.field(static=True)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c2"]:
        c = self.convs
        b1 = c["branch1x1"](x)
        a = c["branch3x3_1"](x)
        b3 = jnp.concatenate([c["branch3x3_2a"](a), c["branch3x3_2b"](a)], axis=-1)
        d = c["branch3x3dbl_2"](c["branch3x3dbl_1"](x))
        bd = jnp.concatenate([c["branch3x3dbl_3a"](d), c["branch3x3dbl_3b"](d)], axis=-1)
        pooled = _max_pool(x, 3, 1, 1) if self.max_pool else _avg_pool_3x3_exclude_pad(x)
        bp = c["branch_pool"](pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# --------------------------------------------------------------------------- resize


def resize_matrix(in_size: int, out_size: int, convention: InputConvention) -> np.ndarray:
    """The (out, in) matrix of one axis of a bilinear resize in the given convention.

    **Arguments:**
    - `in_size`, `out_size`: the axis lengths.
    - `convention`: ``"tf1"`` (source ``dst * in / out``) or ``"pytorch_fid"`` (source
      ``(dst + 0.5) * in / out - 0.5`` clamped at 0).

    **Returns:** a float32 matrix whose rows hold the two interpolation weights.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if convention == "tf1":
        src = dst * scale
    else:
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), np.float32(1.0) - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _check_convention(convention: str) -> None:
    if convention not in get_args(InputConvention):
        raise ValueError(
            f"convention={convention!r} is not allowed; choose 'tf1' or 'pytorch_fid'."
        )


def preprocess(
    image: UInt8[Array, "c h w"], convention: InputConvention = "tf1"
) -> Float[Array, "3 299 299"]:
    """Resize a uint8 image to 299x299 and scale it to [-1, 1] as the evaluator does.

    **Arguments:**
    - `image`: one image, channels first, 1 (grey, repeated to RGB) or 3 channels, any size.
    - `convention`: ``"tf1"`` or ``"pytorch_fid"`` (see the module docstring).

    **Returns:** the network input, channels first.
    """
    _check_convention(convention)
    c, h, w = image.shape
    if c not in (1, 3):
        raise ValueError(f"Inception takes 1 or 3 channels, not {c}; pass (c, h, w) images.")
    x = image.astype(jnp.float32)
    if convention == "pytorch_fid":
        x = x / 255.0
    ry = jnp.asarray(resize_matrix(h, INPUT_SIZE, convention))
    rx = jnp.asarray(resize_matrix(w, INPUT_SIZE, convention))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("yh,chw->cyw", ry, x, precision=hi)
    x = jnp.einsum("cyw,xw->cyx", x, rx, precision=hi)
    x = 2.0 * x - 1.0 if convention == "pytorch_fid" else (x - 128.0) / 128.0
    return jnp.broadcast_to(x, (3, INPUT_SIZE, INPUT_SIZE))


# --------------------------------------------------------------------------- network


class InceptionV3(eqx.Module):
    """The FID InceptionV3 up to ``pool3``: a 299x299 RGB image in [-1, 1] to 2048 features.

    Build it with `load_inception`; apply it to uint8 images of any size with
    `inception_features` (batched) or `InceptionV3.features` (one image).
    """

    stem: tuple[ConvBN, ...]
    mixed_5: tuple[InceptionA, ...]
    mixed_6a: InceptionB
    mixed_6: tuple[InceptionC, ...]
    mixed_7a: InceptionD
    mixed_7: tuple[InceptionE, InceptionE]

    def __init__(self, weights: Mapping[str, np.ndarray]):
        """**Arguments:**
        - `weights`: the arrays of the npz layout (see `expected_shapes`); validated here.
        """
        validate_weights(weights)
        self.stem = tuple(ConvBN(weights, spec) for spec in ARCHITECTURE[:5])
        self.mixed_5 = tuple(
            InceptionA(_convs(weights, b)) for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d")
        )
        self.mixed_6a = InceptionB(_convs(weights, "Mixed_6a"))
        self.mixed_6 = tuple(
            InceptionC(_convs(weights, b)) for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
        )
        self.mixed_7a = InceptionD(_convs(weights, "Mixed_7a"))
        self.mixed_7 = (
            InceptionE(_convs(weights, "Mixed_7b"), max_pool=False),
            InceptionE(_convs(weights, "Mixed_7c"), max_pool=True),
        )

    def __call__(self, x: Float[Array, "3 299 299"]) -> Float[Array, "2048"]:
        """Features of one preprocessed image.

        **Arguments:**
        - `x`: the image in [-1, 1], channels first, 299x299 (see `preprocess`).

        **Returns:** the 2048-d ``pool3`` features.
        """
        h = jnp.transpose(x, (1, 2, 0))
        conv1a, conv2a, conv2b, conv3b, conv4a = self.stem
        h = _max_pool(conv2b(conv2a(conv1a(h))), 3, 2, 0)
        h = _max_pool(conv4a(conv3b(h)), 3, 2, 0)
        for block in self.mixed_5:
            h = block(h)
        h = self.mixed_6a(h)
        for block in self.mixed_6:
            h = block(h)
        h = self.mixed_7a(h)
        for block in self.mixed_7:
            h = block(h)
        return jnp.mean(h, axis=(0, 1))

    def features(
        self, image: UInt8[Array, "c h w"], convention: InputConvention = "tf1"
    ) -> Float[Array, "2048"]:
        """Features of one uint8 image of any size.

        **Arguments:**
        - `image`: channels first, 1 or 3 channels.
        - `convention`: the input convention, ``"tf1"`` (default) or ``"pytorch_fid"``.

        **Returns:** the 2048-d ``pool3`` features.
        """
        return self(preprocess(image, convention))


def load_inception(inception_weights: str | os.PathLike[str] | None = None) -> InceptionV3:
    """The FID InceptionV3 with its weights.

    **Arguments:**
    - `inception_weights`: a ``.npz`` in the npz layout, or pytorch-fid's
      ``pt_inception-2015-12-05-6726825d.pth`` (read without torch). When omitted, that ``.pth``
      is downloaded once from pytorch-fid's GitHub release, checked against its SHA-256 prefix,
      converted and cached under ``$FSDM_EQX_CACHE`` (default ``~/.cache/fsdm_eqx``).

    **Returns:** the network, ready for `inception_features`.

    **Raises:** `InceptionWeightsError` (one sentence naming the fix) when the weights cannot be
    downloaded or read, or are not those of the FID Inception.
    """
    if inception_weights is None:
        path = fetch_weights(validate=validate_weights)
    else:
        path = os.fspath(inception_weights)
    weights = read_weights(path)
    validate_weights(weights, source=path)
    return InceptionV3(weights)


# --------------------------------------------------------------------------- batched features


@eqx.filter_jit
def _network(model: InceptionV3, x: Float[Array, "b 3 299 299"]) -> Float[Array, "b 2048"]:
    return jax.vmap(model)(x)


@eqx.filter_jit
def _preprocess_batch(
    images: UInt8[Array, "b c h w"], convention: InputConvention
) -> Float[Array, "b 3 299 299"]:
    return jax.vmap(preprocess, in_axes=(0, None))(images, convention)


def inception_features(
    model: InceptionV3,
    images: Shaped[np.ndarray, "n ..."] | Shaped[Array, "n ..."],
    *,
    convention: InputConvention = "tf1",
    batch_size: int = 64,
    channels_last: bool = False,
    devices: Sequence[Any] | None = None,
) -> Float[np.ndarray, "n 2048"]:
    """``pool3`` features of many uint8 images, in jitted batches sharded over all devices.

    Every batch has the same shape (the last one is padded and trimmed), so the network compiles
    once; it is compiled apart from the resize, so one compilation serves every input size and
    convention. With several devices, each batch is split along a ``data`` mesh axis
    (`jax.sharding.NamedSharding`) and the parameters are replicated.

    **Arguments:**
    - `model`: the network from `load_inception`.
    - `images`: uint8 images, ``(n, c, h, w)`` with c = 1 or 3 (``(n, h, w, c)`` when
      `channels_last`), any size; they are resized to 299x299.
    - `convention`: ``"tf1"`` (default: TF1 resize, ``(x - 128) / 128``) or ``"pytorch_fid"``
      (torch's half-pixel resize, ``2 x / 255 - 1``); see the module docstring.
    - `batch_size`: images per step, rounded up to a multiple of the device count.
    - `channels_last`: whether `images` are ``(n, h, w, c)``.
    - `devices`: the devices to split each batch over (default: ``jax.local_devices()``).

    **Returns:** a float32 numpy array ``(n, 2048)``.
    """
    _check_convention(convention)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"Inception takes uint8 images in [0, 255], not {images.dtype}; convert them first "
            "(for x in [-1, 1], fsdm_eqx.data.pixels.to_uint8(x))."
        )
    if images.ndim != 4:
        raise ValueError(
            f"Inception takes a batch of images (n, c, h, w), not an array of shape {images.shape}."
        )
    if channels_last:
        images = np.transpose(images, (0, 3, 1, 2))
    if images.shape[1] not in (1, 3):
        layout = "(n, h, w, c)" if channels_last else "(n, c, h, w)"
        raise ValueError(
            f"Inception takes 1 or 3 channels, but images of shape {images.shape} read as "
            f"{layout} have {images.shape[1]}; check channels_last."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; it must be at least 1.")
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = make_mesh(devices)
    model = jax.device_put(model, replicated_sharding(mesh))

    def features(x: UInt8[Array, "b c h w"]) -> Float[Array, "b 2048"]:
        return _network(model, _preprocess_batch(x, convention))

    step = min(batch_size, max(images.shape[0], 1))
    out = map_in_batches(features, (images,), step, sharding=batch_sharding(mesh))
    return np.asarray(out, dtype=np.float32)
