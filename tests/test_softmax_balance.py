"""SoftmaxBalance [BKV Alg. 2, Thm 3.3] against balancekv.bounds.balance.softmax_balance_bound.

Bound checked (proofs/softmax_balance.md): for a fixed query q, with probability
>= 1 - delta - 2n exp(-c/4),
||2 sum_{C'} e^{a_i} v_i - sum_i e^{a_i} v_i|| <= sqrt(s) sqrt(4c log(2s/delta)) e^{scale(|q|^2 + r_k^2)/2} r_v,
run where it is informative (n = 1e4, s = 1) beside fair coins that must break it (balancekv.bounds.checks).
Seeds are fixed.
"""

import numpy as np
import pytest
from balancekv.reference.softmax_balance import (
    kept_class,
    softmax_balance,
    softmax_balance_signs,
    softmax_balance_signs_incremental,
)
from balancekv.reference.walk import WalkFailure
from hypothesis import given, settings
from hypothesis import strategies as st

from balancekv.bounds import checks


@pytest.mark.slow
def test_theorem_3_3_holds_at_n_1e4_and_fair_coins_break_it():
    """[BKV] Thm 3.3 (our constants, softmax_balance_bound, s = 1, delta_t = 0.05, c = 30 log(n/delta) = 414):
    one halving of n = 1e4 tokens whose kernel features are nearly parallel (keys |k| <= 0.5 in R^2, v = 1),
    64 walks x 8 queries by the incremental walk; every query's exceedance count <= the Binomial(64, 0.05)
    allowance and no walk FAILs. The largest possible discrepancy sum e^a is 109x the bound, so the test is
    not vacuous; control: fair coins on the same uniforms (discrepancy ~ sqrt(n) = 100 against a bound of
    ~90) must exceed the allowance. Measured: walk 0.34 of the bound at the 95% quantile, coins 2.2."""
    res = checks.softmax_balance_check(0)
    assert res.algorithm.within and res.algorithm.ratio < 1, res.summary()
    (coins,) = res.controls
    assert not coins.within and coins.ratio > 1, coins.summary()


def test_incremental_walk_equals_gram_walk_including_fail():
    """softmax_balance_signs_incremental computes the Gram rows on the fly: same signs and FAIL steps as
    softmax_balance_signs on the broadcast problem (c = 3 walks through, c = 0.01 fails)."""
    rng = np.random.default_rng(6)
    n, d = 200, 3
    K, V, r = rng.normal(size=(n, d)), rng.normal(size=(n, 2)), rng.random((4, n))
    for c in (3.0, 0.01):
        a, fa = softmax_balance_signs(np.broadcast_to(K, (4, n, d)), np.broadcast_to(V, (4, n, 2)), r, scale=0.4, c=c)
        b, fb = softmax_balance_signs_incremental(K, V, r, scale=0.4, c=c)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(fa, fb)
    assert np.any(fb >= 0) and np.all(b[fb >= 0][:, -1] == 0)


def discrepancy(K, V, x, q, scale):
    """||2 sum_{C'} e^a v - sum e^a v|| for sign vector x, and the identity with the signed sum."""
    e = np.exp(scale * K @ q)
    keep = x == kept_class(x)
    est = 2 * (e[keep] @ V[keep])
    full = e @ V
    signed = (e * x) @ V
    np.testing.assert_allclose(np.abs(est - full), np.abs(signed), rtol=1e-9, atol=1e-9)
    return np.linalg.norm(est - full)


def test_error_of_the_kept_half_is_the_signed_sum():
    """2 sum_{C'} e^a v - sum e^a v = +-(sum_i x_i e^a_i v_i) for the smaller class (proofs/softmax_balance.md),
    the identity every Thm 3.3 check relies on."""
    rng = np.random.default_rng(21)
    K, V = rng.normal(size=(64, 4)), rng.normal(size=(64, 3))
    out = softmax_balance(K, V, rng.random(64))
    for q in rng.normal(size=(3, 4)):
        assert discrepancy(K, V, out.signs, q, 0.5) >= 0


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
