"""SoftmaxBalance [BKV Alg. 2, Thm 3.3] against balancekv.bounds.balance.softmax_balance_bound.

Bound checked (proofs/softmax_balance.md): for a fixed query q, with probability
>= 1 - delta - 2n exp(-c/4),
||2 sum_{C'} e^{a_i} v_i - sum_i e^{a_i} v_i|| <= sqrt(s) sqrt(4c log(2s/delta)) e^{scale(|q|^2 + r_k^2)/2} r_v.
Seeds are fixed; exceedance allowances have false-alarm probability < 1e-9.
"""

import numpy as np
import pytest
from balancekv.reference.softmax_balance import kept_class, softmax_balance, softmax_balance_signs
from balancekv.reference.walk import WalkFailure, default_threshold
from hypothesis import given, settings
from hypothesis import strategies as st

from balancekv.bounds.balance import softmax_balance_bound

TRIALS = 200
DELTA = 0.05
MAX_EXCEED = 35  # Binomial(200, 0.05): mean 10, sd 3.1; P(> 35) < 1e-9


def discrepancy(K, V, x, q, scale):
    """||2 sum_{C'} e^a v - sum e^a v|| for sign vector x (exact arithmetic identity check included)."""
    e = np.exp(scale * K @ q)
    keep = x == kept_class(x)
    est = 2 * (e[keep] @ V[keep])
    full = e @ V
    signed = (e * x) @ V
    np.testing.assert_allclose(np.abs(est - full), np.abs(signed), rtol=1e-9, atol=1e-9)
    return np.linalg.norm(est - full)


@pytest.mark.parametrize("which", ["numerator", "denominator"])
def test_discrepancy_within_theorem_bound(which):
    rng = np.random.default_rng(21)
    n, d, s = 128, 8, 4
    K = rng.normal(size=(n, d))
    V = rng.normal(size=(n, s)) if which == "numerator" else np.ones((n, 1))
    scale = 1 / np.sqrt(d)
    c = default_threshold(n, 0.01)
    signs, failed = softmax_balance_signs(
        np.broadcast_to(K, (TRIALS, n, d)),
        np.broadcast_to(V, (TRIALS,) + V.shape),
        rng.random((TRIALS, n)),
        scale=scale,
        c=c,
    )
    assert np.all(failed == -1)
    r_k = np.linalg.norm(K, axis=1).max()
    r_v = np.linalg.norm(V, axis=1).max()
    for q in rng.normal(size=(4, d)):
        bound = softmax_balance_bound(V.shape[1], np.linalg.norm(q), r_k, r_v, scale, c, DELTA)
        disc = np.array([discrepancy(K, V, x, q, scale) for x in signs])
        assert np.count_nonzero(disc > bound) <= MAX_EXCEED


def test_output_is_smaller_class_with_weight_two_and_reproducible():
    rng = np.random.default_rng(2)
    K, V, r = rng.normal(size=(50, 6)), rng.normal(size=(50, 3)), rng.random(50)
    out = softmax_balance(K, V, r)
    again = softmax_balance(K.copy(), V.copy(), r.copy())
    np.testing.assert_array_equal(out.indices, again.indices)
    assert out.indices.size <= 25
    assert np.all(np.diff(out.indices) > 0) and out.indices.min() >= 0 and out.indices.max() < 50
    np.testing.assert_allclose(out.log_weights, np.log(2.0))
    cls = out.signs[out.indices]
    assert np.all(cls == cls[0]) and np.count_nonzero(out.signs == cls[0]) <= 25


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), s=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_shape_properties(n, s, seed):
    """Output size <= n/2, indices unique and in range, same uniforms -> same result."""
    rng = np.random.default_rng(seed)
    K, V, r = rng.normal(size=(n, 5)), rng.normal(size=(n, s)), rng.random(n)
    out = softmax_balance(K, V, r)
    assert out.indices.size <= n // 2
    assert len(set(out.indices.tolist())) == out.indices.size
    assert np.all((out.indices >= 0) & (out.indices < n))
    np.testing.assert_array_equal(out.indices, softmax_balance(K, V, r).indices)


def test_fail_raises_walk_failure():
    K = np.zeros((4, 2))
    V = np.ones((4, 1))
    with pytest.raises(WalkFailure) as exc:
        softmax_balance(K, V, np.full(4, 0.25), c=0.5)
    assert exc.value.step == 1


def test_huge_norms_and_zero_values_do_not_overflow():
    rng = np.random.default_rng(4)
    K = 1e4 * rng.normal(size=(30, 4))
    out = softmax_balance(K, rng.normal(size=(30, 2)), rng.random(30))
    assert out.indices.size <= 15
    out0 = softmax_balance(rng.normal(size=(10, 3)), np.zeros((10, 2)), rng.random(10))
    assert out0.indices.size <= 5
