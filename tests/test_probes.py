"""reference.probes.fitted_probes: shape, determinism by seed, degenerate sizes, moments."""

import numpy as np
import pytest
from balancekv.reference.probes import fitted_probes


def test_shape_and_dtype():
    K = np.random.default_rng(0).normal(size=(2, 3, 50, 8))
    P = fitted_probes(K, 16, seed=1)
    assert P.shape == (2, 3, 16, 8) and P.dtype == np.float64


def test_deterministic_by_seed():
    K = np.random.default_rng(0).normal(size=(3, 40, 6))
    np.testing.assert_array_equal(fitted_probes(K, seed=5), fitted_probes(K, seed=5))
    assert not np.array_equal(fitted_probes(K, seed=5), fitted_probes(K, seed=6))


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 1), (2, 1, 4), (2, 5, 1)])
def test_no_nan_for_tiny_inputs(shape):
    K = np.random.default_rng(0).normal(size=shape)
    P = fitted_probes(K, 4, seed=0)
    assert P.shape == shape[:-2] + (4, shape[-1])
    assert np.all(np.isfinite(P))
    if shape[-2] == 1:  # one key: the covariance is 0, every probe is that key
        np.testing.assert_allclose(P, np.broadcast_to(K, P.shape))


def test_moments_match_the_shrunk_gaussian():
    rng = np.random.default_rng(3)
    K = rng.normal(size=(400, 3)) @ np.diag([3.0, 1.0, 0.2]) + np.array([5.0, -1.0, 0.0])
    P = fitted_probes(K, 20000, spread=0.5, seed=0)
    np.testing.assert_allclose(P.mean(0), K.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(P.T), 0.25 * np.cov(K.T, bias=True), rtol=0.05, atol=0.01)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        fitted_probes(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        fitted_probes(np.zeros((4, 3)), 0)
    with pytest.raises(ValueError):
        fitted_probes(np.zeros((4, 3)), spread=-1.0)
    with pytest.raises(ValueError):
        fitted_probes(np.full((4, 3), np.nan))
