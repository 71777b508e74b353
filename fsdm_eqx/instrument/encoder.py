"""The set encoder's internals and the saliency of the context, as pure functions of a model.

Everything is read from the encoder's own forward pass (`AbstractSetEncoder.trace`, which keeps
the attention weights and the residual branches of every block) at inference (no dropout, the
posterior mean); nothing here is a second implementation of the encoder. The heavy parts run under
`eqx.filter_jit` and only small arrays reach the host. The token order is that of
`AbstractSetEncoder.encode`: the class token, the timestep token if any, then each image's patches.

`collect_visuals` gathers all of it for a few fixed sets, as the images, histograms and scalars
that a training loop sends to its sink at evaluation time.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree, UInt8

from .._tree import top_level_name
from ..nn.fsdm import FSDM
from ..nn.vit import AbstractSetEncoder
from .figures import heatmap, maps_figure, tile_rows


class Visuals(NamedTuple):
    """What a training loop logs at evaluation time, each part for its own sink method."""

    images: dict[str, np.ndarray]
    """uint8 RGB images `(H, W, 3)`, for `Sink.log_images`."""
    histograms: dict[str, np.ndarray]
    """Raw values to bin, for `Sink.log_histograms`."""
    scalars: dict[str, float]
    """Scalars, for `Sink.log`."""


def _depth(encoder: AbstractSetEncoder) -> int:
    return len(encoder.trunk.transformer.blocks)


def _num_heads(encoder: AbstractSetEncoder) -> int:
    return encoder.trunk.transformer.blocks[0].attention.num_heads


def _grid_side(encoder: AbstractSetEncoder) -> int:
    return math.isqrt(encoder.trunk.num_patches)


def _check_set(encoder: AbstractSetEncoder, x_set: Array, what: str = "x_set") -> None:
    side = _grid_side(encoder) * encoder.patch_size
    if x_set.ndim != 4 or tuple(x_set.shape[2:]) != (side, side) or x_set.shape[0] < 1:
        raise ValueError(
            f"{what} must be one set of images (m, c, {side}, {side}) for this encoder, got "
            f"shape {tuple(x_set.shape)}; pass a single set (index a batch of sets first)."
        )


def _check_indices(values: Sequence[int], size: int, what: str) -> tuple[int, ...]:
    chosen = tuple(int(v) for v in values)
    if not chosen or any(not 0 <= v < size for v in chosen):
        raise ValueError(
            f"{what}={list(values)} must be a non-empty list of indices in 0..{size - 1} "
            f"(the encoder has {size} {what})."
        )
    return chosen


def _timestep(t: float | None) -> Float[Array, ""] | None:
    return None if t is None else jnp.asarray(t, jnp.float32)


def rollout_matrix(attention: Float[Array, "depth heads n n"]) -> Float[Array, "n n"]:
    """Attention rollout (Abnar & Zuidema 2020) of a stack of attention weights.

    Each layer's weights are averaged over heads, the identity is added (the residual path) and
    the rows are renormalised; the layers are multiplied from the first to the last, so row ``i``
    of the result is how much output token ``i`` draws on each input token.

    **Arguments:**
    - `attention`: `(depth, heads, n, n)` weights whose rows sum to one.

    **Returns:** the rollout `A_L ... A_1`, `(n, n)`.
    """
    n = attention.shape[-1]
    mixed = jnp.mean(attention, axis=1) + jnp.eye(n, dtype=attention.dtype)[None]
    mixed = mixed / jnp.sum(mixed, axis=-1, keepdims=True)
    rollout = mixed[0]
    for layer in mixed[1:]:
        rollout = jnp.matmul(layer, rollout, precision=jax.lax.Precision.HIGHEST)
    return rollout


@eqx.filter_jit
def _encoder_views(
    encoder: AbstractSetEncoder, x_sets: Float[Array, "b m c h w"], t: Float[Array, ""] | None
) -> dict[str, Array]:
    """Class-token attention of every layer and head, rollout and branch moments of a batch of
    sets, in one traced pass; only these small arrays leave the device."""
    k = encoder.trunk.num_special
    m, side = encoder.token_groups(x_sets.shape[1]), _grid_side(encoder)

    def one(x_set: Float[Array, "m c h w"]) -> dict[str, Array]:
        trace = encoder.trace(x_set, t, inference=True)
        depth, heads = trace.attention.shape[:2]
        return {
            "attention": trace.attention[:, :, 0, k:].reshape(depth, heads, m, side, side),
            "rollout": rollout_matrix(trace.attention)[0, k:].reshape(m, side, side),
            "attn": trace.attn_out,
            "mlp": trace.mlp_out,
        }

    out = jax.vmap(one)(x_sets)
    views = {"attention": out["attention"], "rollout": out["rollout"]}
    for branch in ("attn", "mlp"):
        values = out[branch].astype(jnp.float32)
        views[f"{branch}_mean"] = jnp.mean(values, axis=(0, 2, 3))
        views[f"{branch}_std"] = jnp.std(values, axis=(0, 2, 3))
    return views


def attention_maps(
    encoder: AbstractSetEncoder,
    x_set: Float[Array, "m c h w"],
    *,
    layers: Sequence[int],
    heads: Sequence[int],
    t: float | None = None,
) -> Float[np.ndarray, "layers heads g gh gw"]:
    """Attention from the class token to the patches of each image, on the patch grid.

    With `cls` pooling the class token is the context; with the other poolings it is still the
    token that gathers the set, and its attention shows what each layer reads.

    **Arguments:**
    - `encoder`: the set encoder.
    - `x_set`: one set `(m, c, h, w)`.
    - `layers`, `heads`: the blocks and heads to show (indices from 0).
    - `t`: the timestep, for an encoder with a timestep token.

    **Returns:** the weights `(len(layers), len(heads), g, h / patch, w / patch)`, with `g` the
    encoder's token groups (`m` for the ViT, one for the stacked sViT).
    """
    _check_set(encoder, x_set)
    chosen_layers = _check_indices(layers, _depth(encoder), "layers")
    chosen_heads = _check_indices(heads, _num_heads(encoder), "heads")
    attention = np.asarray(_encoder_views(encoder, x_set[None], _timestep(t))["attention"][0])
    return attention[np.asarray(chosen_layers)][:, np.asarray(chosen_heads)]


def attention_rollout(
    encoder: AbstractSetEncoder, x_set: Float[Array, "m c h w"], *, t: float | None = None
) -> Float[np.ndarray, "g gh gw"]:
    """The class token's attention rollout over all layers, on each image's patch grid.

    **Arguments:**
    - `encoder`: the set encoder.
    - `x_set`: one set `(m, c, h, w)`.
    - `t`: the timestep, for an encoder with a timestep token.

    **Returns:** the class token's row of `rollout_matrix` restricted to the patches,
    `(g, h / patch, w / patch)`, `g` as in `attention_maps`.
    """
    _check_set(encoder, x_set)
    views = _encoder_views(encoder, x_set[None], _timestep(t))
    return np.asarray(views["rollout"][0])


def _branch_scalars(views: dict[str, Array]) -> dict[str, float]:
    host = jax.device_get({k: v for k, v in views.items() if k.endswith(("_mean", "_std"))})
    scalars: dict[str, float] = {}
    for block in range(len(host["attn_mean"])):
        for name in ("attn_mean", "attn_std", "mlp_mean", "mlp_std"):
            scalars[f"encoder/block{block}/{name}"] = float(host[name][block])
    return scalars


def activation_stats(
    encoder: AbstractSetEncoder, x_set: Float[Array, "m c h w"], *, t: float | None = None
) -> dict[str, float]:
    """Mean and standard deviation of each block's attention and MLP outputs.

    These are the residual branches, the updates each block adds to the token stream, over all
    tokens and features of the set.

    **Arguments:**
    - `encoder`: the set encoder.
    - `x_set`: one set `(m, c, h, w)`.
    - `t`: the timestep, for an encoder with a timestep token.

    **Returns:** `encoder/block{l}/attn_mean`, `attn_std`, `mlp_mean` and `mlp_std` per block.
    """
    _check_set(encoder, x_set)
    return _branch_scalars(_encoder_views(encoder, x_set[None], _timestep(t)))


def position_similarity(encoder: AbstractSetEncoder) -> Float[np.ndarray, "p p"]:
    """Cosine similarity between the position embeddings of every pair of patch positions.

    **Arguments:**
    - `encoder`: the set encoder.

    **Returns:** the `(patches, patches)` matrix, positions in row-major patch order.
    """
    position = encoder.trunk.position[encoder.trunk.num_special :].astype(jnp.float32)
    norms = jnp.maximum(jnp.linalg.norm(position, axis=-1, keepdims=True), 1e-12)
    unit = position / norms
    return np.asarray(jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST))


def position_similarity_image(
    encoder: AbstractSetEncoder, *, scale: int = 4, cmap: str = "viridis"
) -> UInt8[np.ndarray, "H W 3"]:
    """The heat map of `position_similarity`, one tile per patch position.

    Tile ``(r, c)`` shows the similarity of position ``(r, c)`` to every position on the patch
    grid, coloured from -1 to 1 (as in Dosovitskiy et al. 2021, figure 7).

    **Arguments:**
    - `encoder`: the set encoder.
    - `scale`: pixels per grid cell within a tile.
    - `cmap`: the colormap.

    **Returns:** uint8 RGB.
    """
    similarity = position_similarity(encoder)
    side = _grid_side(encoder)
    tiles = [
        (heatmap(row.reshape(side, side), vmin=-1.0, vmax=1.0, cmap=cmap, scale=scale), None)
        for row in similarity
    ]
    return tile_rows([tiles[i : i + side] for i in range(0, len(tiles), side)], pad=1)


@eqx.filter_jit
def _saliency(
    model: FSDM,
    x_sets: Float[Array, "b m c h w"],
    t: Float[Array, ""] | None,
    key: PRNGKeyArray,
    project: Bool[Array, ""],
) -> Float[Array, "b m h w"]:
    """Channel norm of the gradient of each set's context objective w.r.t. its images.

    The objective is ``<r, c>`` with ``r ~ N(0, I)`` from `key` when `project`, else ``|c|^2``;
    both share one compiled function.
    """

    def objective(x_set: Float[Array, "m c h w"]) -> Float[Array, ""]:
        context = model.context(x_set, t, inference=True).c.astype(jnp.float32)
        projection = jax.random.normal(key, context.shape)
        return jnp.where(project, jnp.sum(projection * context), jnp.sum(jnp.square(context)))

    # sets are independent, so the gradient of the sum gives each set's own gradient
    grads = jax.grad(lambda xs: jnp.sum(jax.vmap(objective)(xs)))(x_sets)
    return jnp.sqrt(jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=2))


def _saliency_maps(
    model: FSDM,
    x_sets: Float[Array, "b m c h w"],
    t: float | None,
    key: PRNGKeyArray | None,
) -> Float[np.ndarray, "b m h w"]:
    project = jnp.asarray(key is not None)
    key = jax.random.key(0) if key is None else key
    return np.asarray(_saliency(model, x_sets, _timestep(t), key, project))


def _check_model_images(model: FSDM, x: Array, what: str, axes: str) -> None:
    rank = len(axes.split()) + 3
    if x.ndim != rank or tuple(x.shape[-3:]) != model.image_shape or 0 in x.shape:
        raise ValueError(
            f"{what} must have shape ({axes}, c, h, w) with (c, h, w) = {model.image_shape}, "
            f"got {tuple(x.shape)}; pass images channels first at the model's size."
        )


def context_saliency(
    model: FSDM,
    x_set: Float[Array, "m c h w"],
    *,
    t: float | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[np.ndarray, "m h w"]:
    """How strongly each pixel of each support image moves the context.

    The saliency of image ``j`` is the norm over channels of ``d f / d x_j`` with
    ``f = ||c||^2``, or ``f = <r, c>`` for a fixed random projection ``r ~ N(0, I)`` drawn from
    `key`; ``c`` is the model's context of the whole set at inference (the posterior mean).

    **Arguments:**
    - `model`: the few-shot diffusion model.
    - `x_set`: one set `(m, c, h, w)` at the model's image size.
    - `t`: the timestep, for an encoder with a timestep token.
    - `key`: draws the projection `r`; None uses the squared norm.

    **Returns:** the maps `(m, h, w)`.
    """
    _check_model_images(model, x_set, "x_set", "m")
    return _saliency_maps(model, x_set[None], t, key)[0]


def parameter_histograms(
    tree: PyTree, prefix: str, *, max_values: int | None = None
) -> dict[str, np.ndarray]:
    """The floating-point values of each top-level subtree, flattened, to be binned by a sink.

    **Arguments:**
    - `tree`: parameters or gradients (e.g. an `FSDM`: subtrees encoder, posterior, denoiser).
    - `prefix`: the name before the subtree, e.g. `params` or `grads`.
    - `max_values`: keep at most this many values per subtree, an even stride through them.

    **Returns:** `{prefix}/{subtree}` to a float32 vector, for subtrees with floating-point arrays.
    """
    if max_values is not None and max_values < 1:
        raise ValueError(f"max_values={max_values} must be >= 1 or None.")
    groups: dict[str, list[Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact):
            name = f"{prefix}/{top_level_name(path)}" if path else prefix
            groups.setdefault(name, []).append(jnp.ravel(leaf).astype(jnp.float32))
    values: dict[str, Array] = {}
    for name, leaves in groups.items():
        flat = jnp.concatenate(leaves)
        if max_values is not None and flat.size > max_values:
            flat = flat[:: -(-flat.size // max_values)]
        values[name] = flat
    return {name: np.asarray(v) for name, v in jax.device_get(values).items()}


def collect_visuals(
    model: FSDM,
    fixed_sets: Float[Array, "b m c h w"],
    *,
    layers: Sequence[int],
    heads: Sequence[int],
    key: PRNGKeyArray | None,
    grads: PyTree | None = None,
    t: float | None = None,
    max_histogram_values: int | None = 1 << 20,
) -> Visuals:
    """The encoder's visuals, activation statistics and histograms for a few fixed sets.

    **Arguments:**
    - `model`: the model to look at (e.g. the EMA model).
    - `fixed_sets`: `(b, m, c, h, w)`, chosen once so that the figures compare across steps.
    - `layers`, `heads`: the attention maps to draw.
    - `key`: the fixed random projection of the saliency (the same key every time); None uses
      the squared norm of the context.
    - `grads`: gradients with the model's structure, for gradient histograms.
    - `t`: the timestep for an encoder with a timestep token (default 0, the clean images).
    - `max_histogram_values`: values kept per histogram (see `parameter_histograms`).

    **Returns:** `Visuals` with images `encoder/attention_layer{l}_head{h}_set{i}`,
    `encoder/rollout_set{i}`, `encoder/saliency_set{i}` (each: the set's images above their
    maps) and `encoder/position_similarity`; histograms `params/<subtree>` (and
    `grads/<subtree>`); scalars `encoder/block{l}/...` from `activation_stats`, over all sets.
    An encoder without attention (`UNetSetEncoder`) gets the saliency maps and histograms only.
    """
    _check_model_images(model, fixed_sets, "fixed_sets", "b m")
    if t is None and model.time_token:
        t = 0.0
    saliency = _saliency_maps(model, fixed_sets, t, key)
    sets = np.asarray(fixed_sets)
    images = {
        f"encoder/saliency_set{i}": maps_figure(x_set, saliency[i], cmap="magma")
        for i, x_set in enumerate(sets)
    }
    histograms = parameter_histograms(model, "params", max_values=max_histogram_values)
    if grads is not None:
        histograms |= parameter_histograms(grads, "grads", max_values=max_histogram_values)
    encoder = model.encoder
    if not isinstance(encoder, AbstractSetEncoder):
        return Visuals(images, histograms, {})  # no attention to draw (the UNet encoder)
    chosen_layers = _check_indices(layers, _depth(encoder), "layers")
    chosen_heads = _check_indices(heads, _num_heads(encoder), "heads")
    views = _encoder_views(encoder, fixed_sets, _timestep(t))
    rollout = np.asarray(views["rollout"])
    attention = np.asarray(views["attention"])
    for i, x_set in enumerate(sets):
        for layer in chosen_layers:
            for head in chosen_heads:
                name = f"encoder/attention_layer{layer}_head{head}_set{i}"
                images[name] = maps_figure(x_set, attention[i, layer, head])
        images[f"encoder/rollout_set{i}"] = maps_figure(x_set, rollout[i])
    images["encoder/position_similarity"] = position_similarity_image(encoder)
    return Visuals(images, histograms, _branch_scalars(views))
