"""Layer helpers shared by the set encoders, the DiT and the UNet.

Key splitting that tolerates no key (inference), linear layers with a chosen initialisation,
per-token application of vector layers, the sinusoidal timestep embedding, patchifying an image,
and the transformer feed-forward MLP.
"""

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

Initializer = Callable[[PRNGKeyArray, tuple[int, ...]], Array]


def split_key(key: PRNGKeyArray | None, num: int) -> Sequence[PRNGKeyArray | None]:
    """Split ``key`` into ``num`` keys, or give ``num`` Nones when there is no key (inference)."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


def make_linear(
    in_features: int,
    out_features: int,
    *,
    key: PRNGKeyArray,
    use_bias: bool = True,
    weight_init: Initializer | None = None,
) -> eqx.nn.Linear:
    """A linear layer, initialised as in PyTorch unless ``weight_init`` is given.

    **Arguments:**
    - `in_features`, `out_features`: the sizes.
    - `key`: initialisation randomness.
    - `use_bias`: whether the layer has a bias.
    - `weight_init`: an initializer for the `(out_features, in_features)` weight (for example
      `jax.nn.initializers.xavier_uniform()`); with it the bias starts at zero.

    **Returns:** the `eqx.nn.Linear`.
    """
    linear = eqx.nn.Linear(in_features, out_features, use_bias=use_bias, key=key)
    if weight_init is None:
        return linear
    weight = weight_init(key, (out_features, in_features)).astype(linear.weight.dtype)
    linear = eqx.tree_at(lambda m: m.weight, linear, weight)
    if use_bias:
        linear = eqx.tree_at(lambda m: m.bias, linear, jnp.zeros((out_features,)))
    return linear


def zero_linear(linear: eqx.nn.Linear) -> eqx.nn.Linear:
    """The layer with its weight and bias set to zero, for zero-initialised outputs (adaLN-Zero)."""
    linear = eqx.tree_at(lambda m: m.weight, linear, jnp.zeros_like(linear.weight))
    if linear.bias is not None:
        linear = eqx.tree_at(lambda m: m.bias, linear, jnp.zeros_like(linear.bias))
    return linear


def apply_tokens(
    layer: Callable[[Float[Array, " a"]], Float[Array, " b"]], x: Float[Array, "n a"]
) -> Float[Array, "n b"]:
    """Apply a per-vector layer (Linear, LayerNorm) to every token.

    A linear layer becomes one tokens-major matmul ``x @ W.T``: `jax.vmap` of `eqx.nn.Linear`
    computes ``W @ x.T``, whose features-major output XLA:CPU then transposes, slower end to end
    (forward and backward of a transformer MLP).
    """
    if isinstance(layer, eqx.nn.Linear):
        y = jnp.dot(x, layer.weight.T)
        return y if layer.bias is None else y + layer.bias[None]
    return jax.vmap(layer)(x)


def timestep_embedding(
    t: Float[Array, ""], dim: int, max_period: float = 10000.0
) -> Float[Array, " dim"]:
    """The sinusoidal embedding of a (possibly fractional) timestep: ``[cos(t f), sin(t f)]``.

    **Arguments:**
    - `t`: the timestep.
    - `dim`: the embedding size (an odd size gets a zero last entry).
    - `max_period`: the longest period, of the lowest frequency.

    **Returns:** the embedding, with frequencies ``f_k = max_period ** (-k / (dim // 2))``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32) * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)])
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((1,), emb.dtype)])
    return emb


def patchify(x: Float[Array, "c h w"], patch_size: int) -> Float[Array, "n pd"]:
    """Cut an image into non-overlapping patches, row-major, each flattened as ``(p, p, c)``."""
    c, h, w = x.shape
    p = patch_size
    x = x.reshape(c, h // p, p, w // p, p)
    return x.transpose(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)


class MLP(eqx.Module):
    """Two linear layers with a GELU between, dropout after each (the transformer feed-forward)."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    approximate_gelu: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        dropout: float = 0.0,
        approximate_gelu: bool = False,
        weight_init: Initializer | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**
        - `dim`: input and output width.
        - `hidden_dim`: the hidden width.
        - `dropout`: dropout after the activation and after the output.
        - `approximate_gelu`: the tanh approximation of GELU (DiT) instead of the exact one.
        - `weight_init`: initializer of both layers (PyTorch's default when None).
        - `key`: initialisation randomness.
        """
        key1, key2 = jax.random.split(key)
        self.fc1 = make_linear(dim, hidden_dim, weight_init=weight_init, key=key1)
        self.fc2 = make_linear(hidden_dim, dim, weight_init=weight_init, key=key2)
        self.dropout = eqx.nn.Dropout(dropout)
        self.approximate_gelu = approximate_gelu

    def __call__(
        self,
        x: Float[Array, "n d"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "n d"]:
        """Apply the MLP to every token; `key` drives dropout unless `inference`."""
        key1, key2 = split_key(key, 2)
        h = jax.nn.gelu(apply_tokens(self.fc1, x), approximate=self.approximate_gelu)
        h = self.dropout(h, key=key1, inference=inference)
        return self.dropout(apply_tokens(self.fc2, h), key=key2, inference=inference)
