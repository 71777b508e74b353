"""The Gaussian posterior over the context, q(c | X) = N(mu, diag(exp(logvar))), and its KL."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class GaussianPosterior(eqx.Module):
    """A head ``Linear -> SiLU -> Linear`` mapping an encoder output to ``(mu, logvar)``."""

    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, hdim: int, *, key: PRNGKeyArray):
        """**Arguments:**
        - `hdim`: size of the encoder output and of the context.
        - `key`: initialisation randomness.
        """
        key1, key2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(hdim, hdim, key=key1)
        self.out = eqx.nn.Linear(hdim, 2 * hdim, key=key2)

    def __call__(
        self, h: Float[Array, " hdim"]
    ) -> tuple[Float[Array, " hdim"], Float[Array, " hdim"]]:
        """The posterior's mean and log-variance for the encoder output ``h``."""
        mu, logvar = jnp.split(self.out(jax.nn.silu(self.hidden(h))), 2)
        return mu, logvar


def reparameterize(
    mu: Float[Array, "*shape"], logvar: Float[Array, "*shape"], *, key: PRNGKeyArray
) -> Float[Array, "*shape"]:
    """A sample ``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``, differentiable in both.

    **Arguments:**
    - `mu`, `logvar`: the Gaussian's mean and log-variance.
    - `key`: draws eps.

    **Returns:** the sample.
    """
    eps = jax.random.normal(key, mu.shape, mu.dtype)
    return mu + jnp.exp(0.5 * logvar) * eps


def gaussian_kl(
    q_mu: Float[Array, "*shape"],
    q_logvar: Float[Array, "*shape"],
    p_mu: Float[Array, "*shape"],
    p_logvar: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """KL(q || p) of diagonal Gaussians, per dimension, in nats.

    ``0.5 * (p_logvar - q_logvar + (exp(q_logvar) + (q_mu - p_mu)**2) / exp(p_logvar) - 1)``.

    **Arguments:**
    - `q_mu`, `q_logvar`: mean and log-variance of q.
    - `p_mu`, `p_logvar`: mean and log-variance of p (zeros for N(0, I)).

    **Returns:** the KL of every dimension; sum for the KL of the joint, or take the mean and
    divide by log 2 for the reference's `klc` in bits per dimension.
    """
    return 0.5 * (
        p_logvar - q_logvar + (jnp.exp(q_logvar) + (q_mu - p_mu) ** 2) * jnp.exp(-p_logvar) - 1.0
    )
