"""FID, KID and precision/recall against closed forms and independent numpy references."""

import itertools

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import special_ortho_group

from fsdm_eqx.metrics import fid as fid_module
from fsdm_eqx.metrics.fid import (
    feature_statistics,
    frechet_distance,
    frechet_distance_eig,
    kid,
    precision_recall,
)

BOTH = [frechet_distance, frechet_distance_eig]


def _random_cov(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    a = rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=d)
    return np.cov(a @ rng.normal(size=(d, d)), rowvar=False)


def test_statistics_match_the_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    stats = feature_statistics(x)
    x64 = x.astype(np.float64)
    mu = x64.sum(axis=0) / 50
    centred = x64 - mu
    sigma = np.einsum("ni,nj->ij", centred, centred) / 49
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-12)


@pytest.mark.parametrize("fn", BOTH)
def test_fid_of_a_set_with_itself_is_zero(fn):
    rng = np.random.default_rng(1)
    stats = feature_statistics(rng.normal(size=(400, 32)))
    value = fn(*stats, *stats)
    assert abs(value) < 1e-8 * np.trace(stats.sigma)


@pytest.mark.parametrize("fn", BOTH)
def test_fid_commuting_gaussians_closed_form(fn):
    # Same eigenvectors: tr sqrt(S1 S2) = sum sqrt(a_i b_i),
    # so FID = |dm|^2 + sum (sqrt a - sqrt b)^2.
    d = 16
    q = special_ortho_group.rvs(d, random_state=2)
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(fn(mu1, s1, mu2, s2), expected, rtol=1e-9)


@pytest.mark.parametrize("fn", BOTH)
def test_fid_non_commuting_2d_closed_form(fn):
    # For a 2x2 matrix M with positive eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 1.5]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    np.testing.assert_allclose(fn(mu1, s1, mu2, s2), expected, rtol=1e-10)


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    d, n = 3, 400_000
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0])
    x = rng.normal(size=(n, d)) * np.sqrt(a)
    y = rng.normal(size=(n, d)) * np.sqrt(b) + 1.0
    expected = d * 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    np.testing.assert_allclose(value, expected, rtol=1e-2)


@pytest.mark.parametrize("d", [64, 256])
def test_both_implementations_agree(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
    s1, s2 = _random_cov(rng, d, 4 * d), _random_cov(rng, d, 4 * d)
    reference = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(frechet_distance_eig(mu1, s1, mu2, s2), reference, rtol=1e-6)


@pytest.mark.slow
def test_both_implementations_agree_at_inception_size():
    rng = np.random.default_rng(0)
    d = 2048
    x = rng.normal(size=(10_000, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    y = np.maximum(x[:5000] + 0.3 * rng.normal(size=(5000, d)), 0.0)
    s1, s2 = feature_statistics(x), feature_statistics(y)
    reference = frechet_distance(*s1, *s2)
    np.testing.assert_allclose(frechet_distance_eig(*s1, *s2), reference, rtol=1e-6)


def test_singular_product_adds_eps_like_pytorch_fid(monkeypatch):
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = _random_cov(rng, 5, 40), _random_cov(rng, 5, 40)
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(RuntimeWarning, match="adding 0.001 to the diagonals"):
        value = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    offset = 1e-3 * np.eye(5)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    tr = np.trace(real_sqrtm((s1 + offset) @ (s2 + offset)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_complex_square_root_is_checked(monkeypatch):
    s = np.eye(3)
    mu = np.zeros(3)
    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", lambda m: m + 1e-5j)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", lambda m: m + 0.1j)
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, s, mu, s)


def test_bad_inputs_give_one_readable_error():
    # Mismatched dimensions are caught by the shape annotations under the test hook; without it,
    # these checks give the message a user sees.
    with pytest.raises(ValueError, match="different dimensions"):
        fid_module._check_pair(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="statistics do not match"):
        fid_module._check_statistics(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="at least 4 are needed"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m = len(x)
    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)
    yy = sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_kid_matches_a_numpy_reference():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(25, 6))
    y = rng.normal(size=(25, 6)) + 0.4
    # A subset as large as the set is a permutation of it, to which the MMD is invariant.
    result = kid(x, y, subset_size=1000, num_subsets=3)
    np.testing.assert_allclose(result.mean, _naive_mmd2(x, y), rtol=1e-10)
    assert result.std < 1e-10


def test_kid_is_unbiased_for_one_dimensional_gaussians():
    # d = 1, x ~ N(a, s^2), y ~ N(b, s^2) independent:
    # E (xy + 1)^3 = E x^3 E y^3 + 3 E x^2 E y^2 + 3 E x E y + 1.
    s = 0.5

    def f(a: float, b: float) -> float:
        return (
            (a**3 + 3 * a * s**2) * (b**3 + 3 * b * s**2)
            + 3 * (a**2 + s**2) * (b**2 + s**2)
            + 3 * a * b
            + 1
        )

    a, b = 0.0, 1.0
    expected = f(a, a) + f(b, b) - 2 * f(a, b)
    rng = np.random.default_rng(6)
    x = s * rng.normal(size=(100_000, 1)) + a
    y = s * rng.normal(size=(100_000, 1)) + b
    result = kid(x, y, subset_size=500, num_subsets=100, seed=1)
    # Four standard errors of the mean over the (nearly independent) subsets.
    assert abs(result.mean - expected) < 4 * result.std / np.sqrt(100)
    same = kid(x, s * rng.normal(size=(100_000, 1)) + a, subset_size=500, num_subsets=100)
    assert abs(same.mean) < 4 * same.std / np.sqrt(100)


def _naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(len(x)):
            others = [np.sum((x[i] - x[j]) ** 2) for j in range(len(x)) if j != i]
            out.append(sorted(others)[k - 1])
        return np.array(out)

    def covered(points: np.ndarray, centres: np.ndarray, r: np.ndarray) -> float:
        hits = [
            any(np.sum((p - c) ** 2) <= rc for c, rc in zip(centres, r, strict=True))
            for p in points
        ]
        return float(np.mean(hits))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_matches_a_naive_reference():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(size=(45, 5)) * 1.3 + 0.5
    expected = _naive_precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_known_configurations():
    real = np.arange(5.0)[:, None]  # 0..4: every 1st-neighbour radius is 1
    fake = np.array([[0.5], [10.0]])  # radii 9.5: every real point is covered
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 1.0))
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 4))
    assert precision_recall(x, x.copy()) == pytest.approx((1.0, 1.0))
    assert precision_recall(x, x + 100.0) == pytest.approx((0.0, 0.0))
