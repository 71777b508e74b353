"""Sample-quality metrics on feature vectors: FID, KID and precision/recall.

Every function takes features as numpy arrays (one row per image, e.g. Inception pool3) and works in
float64, as the reference evaluators do, so that FID figures are comparable with published ones.

- `frechet_distance` follows pytorch-fid and the ADM / FSDM evaluator: ``scipy.linalg.sqrtm`` of
  ``sigma1 @ sigma2``, an ``eps`` offset on both diagonals when the square root is not finite, and
  the imaginary part dropped when the diagonal's is below ``1e-3``.
- `frechet_distance_eig` computes the same number in JAX from eigenvalues only:
  ``tr sqrt(S1 S2) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1)))``, because ``S1 S2`` is similar to
  the symmetric positive semi-definite ``sqrt(S1) S2 sqrt(S1)``. It runs in float64 inside a
  ``jax.enable_x64`` context. Measured at d = 2048 (10,000 ReLU features per set, FID 57.33,
  ``tr S1 + tr S2`` = 1413): float64 agrees with scipy to 3e-14 relative; the same computation in
  float32 is off by 1.3e-4 absolute (2e-6 relative), an error that does not shrink with the FID,
  so float32 would miss the 1e-6 agreement for any FID below ~130.
- `kid`: the unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` averaged over
  random subsets (Binkowski et al. 2018; subset size 1000 and 100 subsets as torch-fidelity).
- `precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019): each set's
  manifold is the union of balls reaching each point's k-th nearest neighbour (k = 3).
"""

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jaxtyping import Array, Float

__all__ = [
    "FeatureStatistics",
    "KIDResult",
    "PrecisionRecall",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_eig",
    "kid",
    "precision_recall",
]


class FeatureStatistics(NamedTuple):
    """Mean and covariance of a set of features, in float64."""

    mu: Float[np.ndarray, " d"]
    sigma: Float[np.ndarray, "d d"]


class KIDResult(NamedTuple):
    """KID: mean and standard deviation of the unbiased MMD^2 over the subsets."""

    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    """Fraction of generated samples on the real manifold, and of real ones on the generated."""

    precision: float
    recall: float


def _as_features(name: str, features: np.ndarray, *, min_rows: int = 2) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-d array (num_images, feature_dim); got shape {features.shape}."
        )
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} has {features.shape[0]} rows; at least {min_rows} are needed.")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} contains NaN or infinite values; check the feature extractor.")
    return features.astype(np.float64)


def _check_pair(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"the two feature sets have different dimensions ({real.shape[1]} and "
            f"{fake.shape[1]}); compute both with the same feature extractor."
        )


def feature_statistics(features: Float[np.ndarray, "n d"]) -> FeatureStatistics:
    """The mean and the unbiased covariance (``np.cov``, ``n - 1``) of ``features`` in float64.

    **Arguments:**
    - `features`: one row per image.

    **Returns:** a `FeatureStatistics` of float64 arrays.
    """
    x = _as_features("features", features)
    return FeatureStatistics(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False))


def _check_statistics(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "the statistics do not match: means of shapes "
            f"{mu1.shape} and {mu2.shape}, covariances of shapes {sigma1.shape} and "
            f"{sigma2.shape}; both sets need a (d,) mean and a (d, d) covariance."
        )
    return mu1, sigma1, mu2, sigma2


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, "d d"],
    *,
    eps: float = 1e-6,
) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)`` with
    ``scipy.linalg.sqrtm``. When the square root is not finite (a nearly singular product),
    ``eps`` is added to both diagonals and a `RuntimeWarning` says so; a complex result whose
    diagonal has an imaginary part above 1e-3 raises, a smaller one is dropped.

    **Arguments:**
    - `mu1`, `sigma1`: mean and covariance of the first set (e.g. generated images).
    - `mu2`, `sigma2`: mean and covariance of the second set (e.g. real images).
    - `eps`: the diagonal offset used when the product is singular.

    **Returns:** the distance, a Python float.
    """
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # sqrtm warns on singular input; finiteness is checked just below, as pytorch-fid does.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = np.asarray(scipy.linalg.sqrtm(sigma1 @ sigma2))
        if not np.all(np.isfinite(covmean)):
            warnings.warn(
                f"the covariance product is singular; adding {eps} to the diagonals.",
                RuntimeWarning,
                stacklevel=2,
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = np.asarray(scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)))
    if np.iscomplexobj(covmean):
        imaginary = np.imag(covmean)
        if not np.allclose(np.diagonal(imaginary), 0, atol=1e-3):
            raise ValueError(
                "the matrix square root has an imaginary component of "
                f"{np.max(np.abs(imaginary)):.3g}; the covariances are too ill-conditioned "
                "(use more images than feature dimensions)."
            )
        covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _psd_sqrt(sigma: Float[Array, "d d"]) -> Float[Array, "d d"]:
    w, v = jnp.linalg.eigh(sigma)
    return (v * jnp.sqrt(jnp.clip(w, 0.0))[None, :]) @ v.T


@jax.jit
def _frechet_eig(
    mu1: Float[Array, " d"],
    sigma1: Float[Array, "d d"],
    mu2: Float[Array, " d"],
    sigma2: Float[Array, "d d"],
) -> Float[Array, ""]:
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    inner = 0.5 * (inner + inner.T)
    tr_covmean = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(inner), 0.0)))
    diff = mu1 - mu2
    return diff @ diff + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * tr_covmean


def frechet_distance_eig(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, "d d"],
) -> float:
    """The Frechet distance from eigenvalues, in JAX float64 (runs on the accelerator).

    ``tr sqrt(sigma1 sigma2)`` is the sum of the square roots of the eigenvalues of
    ``sqrt(sigma1) sigma2 sqrt(sigma1)``, a symmetric positive semi-definite matrix, so two
    ``eigh`` calls replace the general matrix square root; negative round-off eigenvalues are
    clipped to zero, so the result is always real. Agrees with `frechet_distance` to 3e-14
    relative at d = 2048 with full-rank covariances, and takes about half its time on a CPU.

    **Arguments:** as `frechet_distance`, without `eps`.

    **Returns:** the distance, a Python float.
    """
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    with jax.enable_x64(True):
        value = _frechet_eig(
            jnp.asarray(mu1), jnp.asarray(sigma1), jnp.asarray(mu2), jnp.asarray(sigma2)
        )
        return float(value)


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = x @ y.T / x.shape[1] + 1.0
    return k * k * k


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x)
    k_yy = _polynomial_kernel(y, y)
    k_xy = _polynomial_kernel(x, y)
    off_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    off_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_xx + off_yy - 2.0 * k_xy.mean())


def kid(
    real_features: Float[np.ndarray, "n d"],
    fake_features: Float[np.ndarray, "m d"],
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> KIDResult:
    """Kernel Inception Distance: the unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``.

    Each subset draws ``min(subset_size, n, m)`` rows of each set without replacement; the
    unbiased estimator drops the kernel's diagonal within each set. Mean and (population)
    standard deviation over the subsets, as torch-fidelity reports them.

    **Arguments:**
    - `real_features`, `fake_features`: one row per image.
    - `subset_size`: rows per subset (1000 as torch-fidelity; fewer if a set is smaller).
    - `num_subsets`: number of random subsets.
    - `seed`: seed of the numpy generator that draws the subsets.

    **Returns:** a `KIDResult` (mean, std).
    """
    real = _as_features("real_features", real_features)
    fake = _as_features("fake_features", fake_features)
    _check_pair(real, fake)
    if subset_size < 2 or num_subsets < 1:
        raise ValueError(
            f"kid needs subset_size >= 2 and num_subsets >= 1; got {subset_size} and {num_subsets}."
        )
    size = min(subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(real.shape[0], size, replace=False)]
        y = fake[rng.choice(fake.shape[0], size, replace=False)]
        values.append(_mmd2_unbiased(x, y))
    return KIDResult(mean=float(np.mean(values)), std=float(np.std(values)))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ y.T) + (y * y).sum(axis=1)[None, :]
    return np.maximum(sq, 0.0)


def _knn_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (itself excluded)."""
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        d = _squared_distances(x[start : start + batch_size], x)
        # Index 0 of the partition is the row itself (distance 0), so index k is its k-th neighbour.
        radii[start : start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    """Fraction of ``points`` inside at least one ball (``centres``, squared ``radii``)."""
    inside = np.empty(points.shape[0], dtype=bool)
    for start in range(0, points.shape[0], batch_size):
        d = _squared_distances(points[start : start + batch_size], centres)
        inside[start : start + batch_size] = np.any(d <= radii[None, :], axis=1)
    return float(inside.mean())


def precision_recall(
    real_features: Float[np.ndarray, "n d"],
    fake_features: Float[np.ndarray, "m d"],
    *,
    k: int = 3,
    batch_size: int = 1000,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019), as in the ADM/FSDM evaluator.

    The manifold of a set is the union of balls centred on its points, each reaching the
    point's k-th nearest neighbour in the same set. Precision is the fraction of generated
    points inside the real manifold; recall the fraction of real points inside the generated one.
    Distances are computed in float64, ``batch_size`` rows at a time.

    **Arguments:**
    - `real_features`, `fake_features`: one row per image; each set needs more than `k` rows.
    - `k`: the neighbourhood size.
    - `batch_size`: rows per block of the distance matrix (memory is ``batch_size * n``).

    **Returns:** a `PrecisionRecall`.
    """
    if k < 1:
        raise ValueError(f"precision_recall needs k >= 1; got k={k}.")
    real = _as_features("real_features", real_features, min_rows=k + 1)
    fake = _as_features("fake_features", fake_features, min_rows=k + 1)
    _check_pair(real, fake)
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    return PrecisionRecall(
        precision=_coverage(fake, real, real_radii, batch_size),
        recall=_coverage(real, fake, fake_radii, batch_size),
    )
