"""The self-balancing walk [ALS] (reference/walk.py) against balancekv.bounds.walk.

Bounds checked (proofs/self_balancing_walk.md): with threshold c,
P(FAIL) <= 2 n exp(-c/4) (als_failure_probability) and, for a fixed unit t,
P(|<w_n, t>| > sqrt(4 c log(2/delta_t))) <= delta_t (als_direction_bound).
All randomness is seeded, so every test is deterministic.
"""

import numpy as np
import pytest
from balancekv.reference.walk import WalkFailure, default_threshold, gram_walk_signs, self_balancing_walk
from hypothesis import given, settings
from hypothesis import strategies as st

from balancekv.bounds.walk import als_direction_bound, als_failure_probability, als_threshold

TRIALS = 300
DELTA_T = 0.05
# Under the bound the exceedance count is Binomial(TRIALS, <= DELTA_T): mean 15, sd 3.8;
# P(count > 45) < 1e-9, so this allowance makes a false alarm negligible.
MAX_EXCEED = 45


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def family(name, n, D, rng):
    if name == "random":
        return unit_rows(rng.normal(size=(n, D))) * rng.uniform(0.2, 1.0, size=(n, 1))
    if name == "identical":
        return np.repeat(unit_rows(rng.normal(size=(1, D))), n, axis=0)
    if name == "orthonormal":
        return np.eye(D)[:n]
    if name == "parallel":
        base = unit_rows(rng.normal(size=(1, D)))
        return unit_rows(base + 0.01 * rng.normal(size=(n, D)))
    raise ValueError(name)


@pytest.mark.parametrize("name", ["random", "identical", "orthonormal", "parallel"])
def test_direction_discrepancy_within_bound(name):
    """|<w_n, t>| <= als_direction_bound(c, 0.05) in at least 95% of trials (up to the allowance)."""
    rng = np.random.default_rng(11)
    n, D = 200, 200
    U = family(name, n, D, rng)
    c = als_threshold(n, 0.01)
    G = np.broadcast_to(U @ U.T, (TRIALS, n, n))
    signs, failed = gram_walk_signs(G, rng.random((TRIALS, n)), c)
    # FAIL frequency at most delta (here the bound 2n exp(-c/4) is astronomically small)
    assert als_failure_probability(n, c) <= 0.01
    assert np.count_nonzero(failed >= 0) <= max(1, int(0.01 * TRIALS))
    W = signs.astype(float) @ U  # (TRIALS, D) end points
    dirs = np.vstack([unit_rows(rng.normal(size=(3, D))), unit_rows(U.sum(0, keepdims=True) + 1e-12), np.eye(D)[:1]])
    lam = als_direction_bound(c, DELTA_T)
    for t in dirs:
        assert np.count_nonzero(np.abs(W @ t) > lam) <= MAX_EXCEED


def test_balances_better_than_random_signs_on_identical_vectors():
    """Identical unit vectors: the walk's |sum x_i| stays O(sqrt c); random signs reach ~sqrt(n)."""
    rng = np.random.default_rng(3)
    n = 2000
    U = np.ones((n, 1))
    c = default_threshold(n, 0.01)
    sums = []
    for _ in range(10):
        x = self_balancing_walk(U, rng.random(n), c)
        sums.append(abs(int(x.sum())))
    random_sums = np.abs(rng.choice([-1, 1], size=(10, n)).sum(1))
    assert max(sums) <= als_direction_bound(c, 1e-3)
    assert np.median(sums) < np.median(random_sums)


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
