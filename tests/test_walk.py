"""The self-balancing walk [ALS] (reference/walk.py) against balancekv.bounds.walk.

Bounds checked (proofs/self_balancing_walk.md), each in a regime where it is informative and beside
controls that must break it (balancekv.bounds.checks): P(FAIL) <= 2 n exp(-c/4) and, for a fixed
unit t, P(|<w_n, t>| > sqrt(4 c log(2/delta_t))) <= delta_t, at the theorem's c = 30 log(n/delta).
All randomness is seeded, so every test is deterministic.
"""

import math

import numpy as np
import pytest
from balancekv.reference.walk import (
    WalkFailure,
    gram_walk_signs,
    self_balancing_walk,
    self_balancing_walk_batch,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from balancekv.bounds import checks
from balancekv.bounds.walk import (
    ALS_C_MIN,
    PRACTICAL_THRESHOLD_FACTOR,
    als_direction_bound,
    als_threshold,
    check_theorem_threshold,
    practical_threshold,
)


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def family(name, n, D, rng):
    if name == "random":
        return unit_rows(rng.normal(size=(n, D))) * rng.uniform(0.2, 1.0, size=(n, 1))
    if name == "orthonormal":
        return np.eye(D)[:n]
    raise ValueError(name)


def test_direction_bound_holds_where_it_bites_and_coins_and_anti_walk_break_it():
    """[ALS] §2 (our constants, als_direction_bound): at c = 30 log(n/delta), n = 1e5 unit vectors in R^2
    (n = 100 c D, so the drift acts), |<w_n, t>| <= sqrt(4 c log(2/0.05)) = 84 for 48 walks x 5 directions up
    to the Binomial(48, 0.05) allowance (false alarm 1e-6 per direction), and no walk FAILs. Controls on the
    same uniforms must exceed the allowance: fair coins (|<w, t>| ~ sqrt(n/2) = 224) and the anti-walk
    (drift sign reversed). Measured: walk 0.42 of the bound at the 95% quantile, coins 5.7, anti-walk 734."""
    res = checks.walk_direction_check(0)
    assert res.algorithm.within, res.summary()
    assert res.algorithm.ratio < 1
    for ctl in res.controls:
        assert not ctl.within and ctl.ratio > 1, ctl.summary()


def test_fail_bound_holds_where_coins_fail_and_anti_walk_fails():
    """[ALS] (als_failure_probability): P(FAIL) <= 2 n e^{-c/4} (6e-48 here) at c = 30 log(n/delta) on 1e5
    identical vectors in R^1 (n = 207 c): none of 48 walks may FAIL. Controls: fair coins on the same
    uniforms FAIL when their running sum passes c (6 of 48, rate 12.5x delta), the anti-walk always."""
    res = checks.walk_fail_check(0)
    assert res.algorithm.within, res.summary()
    for ctl in res.controls:
        assert not ctl.within and ctl.ratio > 1, ctl.summary()


def test_mgf_claim_is_false_for_small_c_and_the_bound_refuses_it():
    """Hypothesis on c (proofs/self_balancing_walk.md): on orthonormal vectors g = 0 at every step, the signs
    are fair coins whatever c is, and <w_n, t> for t = sum u_i / sqrt(n) is nearly N(0, 1). The claimed
    sqrt(4 c log(2/0.05)) = 1.21 at c = 0.1 is exceeded about 23% of the time (> 0.05 + allowance), so the
    claim needs a lower limit on c; als_direction_bound refuses c < ALS_C_MIN and check_theorem_threshold
    refuses c below 30 log(n/delta), each with a ValueError naming c."""
    rng = np.random.default_rng(1)
    n = 400
    U = np.eye(n)
    w = self_balancing_walk_batch(U, rng.random((400, n)), 0.1)[2]
    stat = np.abs(w.sum(1)) / math.sqrt(n)
    claimed = math.sqrt(4 * 0.1 * math.log(2 / 0.05))
    exceed = np.count_nonzero(stat > claimed)
    assert exceed > checks.binomial_allowance(400, 0.05), exceed
    with pytest.raises(ValueError, match="c = 0.1"):
        als_direction_bound(0.1, 0.05)
    assert als_direction_bound(ALS_C_MIN, 0.05) > 0
    with pytest.raises(ValueError, match="c = 50"):
        check_theorem_threshold(50.0, 1000, 0.01)  # 30 log(1e5) = 345
    assert check_theorem_threshold(als_threshold(1000, 0.01), 1000, 0.01) == als_threshold(1000, 0.01)


def test_practical_threshold_is_the_measured_constant():
    """benchmarks/walk_threshold.py measured the smallest k with FAIL rate <= delta (200 walks per family and
    size, n = 1e3..1e5): k = 1.0; practical_threshold is k log(n/delta), far below the theorem's 30 log(n/delta)."""
    assert PRACTICAL_THRESHOLD_FACTOR == 1.0
    assert practical_threshold(10_000, 0.01) == pytest.approx(math.log(1e6))
    assert practical_threshold(10_000, 0.01) < als_threshold(10_000, 0.01) / 29


def test_batch_walk_equals_vector_walk():
    """self_balancing_walk_batch runs the rule of self_balancing_walk row by row (same signs, same FAIL step)."""
    rng = np.random.default_rng(8)
    U = family("random", 500, 3, rng)
    r = rng.random((4, 500))
    x, failed, end = self_balancing_walk_batch(U, r, 6.0)
    for b in range(4):
        try:
            y = self_balancing_walk(U, r[b], 6.0)
            assert failed[b] == -1
            np.testing.assert_array_equal(x[b], y)
        except WalkFailure as e:
            assert failed[b] == e.step
            np.testing.assert_array_equal(x[b, : e.step], self_balancing_walk(U[: e.step], r[b, : e.step], 6.0))
    np.testing.assert_allclose(end, x.astype(float) @ U)
    _, f, _ = self_balancing_walk_batch(np.ones((5, 1)), np.full((1, 5), 0.25), 0.5)
    assert f[0] == 1


def test_signs_depend_only_on_vectors_and_uniforms_and_gram_form_agrees():
    rng = np.random.default_rng(5)
    U = family("random", 60, 7, rng)
    r = rng.random(60)
    x1 = self_balancing_walk(U, r, c=5.0)
    x2 = self_balancing_walk(U.copy(), r.copy(), c=5.0)
    assert x1.dtype == np.int8 and set(np.unique(x1)) <= {-1, 1}
    np.testing.assert_array_equal(x1, x2)
    xs, failed = gram_walk_signs((U @ U.T)[None], r[None], 5.0)
    assert failed[0] == -1
    np.testing.assert_array_equal(xs[0], x1)


def test_fail_raises_with_step_and_gram_form_reports_it():
    U = np.ones((5, 1))
    r = np.full(5, 0.25)  # step 0: g = 0, p = 1/2, x = +1; step 1: g = 1 > c
    with pytest.raises(WalkFailure) as exc:
        self_balancing_walk(U, r, c=0.5)
    assert exc.value.step == 1
    signs, failed = gram_walk_signs(np.ones((1, 5, 5)), r[None], 0.5)
    assert failed[0] == 1
    assert signs[0, 0] == 1 and np.all(signs[0, 1:] == 0)


def test_bad_input():
    with pytest.raises(ValueError, match="vectors"):
        self_balancing_walk(np.full((3, 2), 2.0), np.zeros(3))
    with pytest.raises(ValueError, match="uniforms"):
        self_balancing_walk(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="uniforms"):
        self_balancing_walk(np.zeros((3, 2)), np.ones(3))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), D=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_walk_never_fails_with_c_above_one_step(n, D, seed):
    """Deterministic consequence of the rule: if c >= n then |g_i| <= i <= n - 1 < c, so no FAIL."""
    rng = np.random.default_rng(seed)
    U = family("random", n, D, rng)
    x = self_balancing_walk(U, rng.random(n), c=float(n))
    assert x.shape == (n,) and np.all(np.abs(x) == 1)
