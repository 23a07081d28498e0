"""Mutation checks (issue 13): every theorem check must fail when the thing it guards is broken.

Two mutations, applied by monkeypatching the module attributes the checks of
:mod:`balancekv.bounds.checks` look up (the same functions the theorem tests in test_walk.py,
test_softmax_balance.py, test_merge_reduce.py and test_subgen.py call):

- **coins**: every walk entry point (``self_balancing_walk_batch``, ``gram_walk_signs``,
  ``softmax_balance_signs_incremental``) returns fair coins on the same uniforms
  (``x = +1`` iff ``r < 1/2``); the vector form reports FAILs by the walk's own rule. Every
  walk-based check (ALS direction, ALS FAIL, Thm 3.3) must then put the algorithm outside its bound.
- **zero**: each estimator (balance-stream's ``z`` for Eq. 2 / Thm 3.4, SubGen's ``z`` for Thm 2.4)
  returns 0. Every estimator check must then fail.

Not claimed: the Eq. 2 check under the coin mutation. At sizes a CPU test can stream (n = 32k, t = 1024)
the theorem's c = 30 log(2t/delta) makes one reduction's bound larger than coins' discrepancy, so the
Eq. 2 bound holds for coin halving too; that check guards the estimator (proofs/README.md says so).
"""

import importlib

import numpy as np
import pytest

from balancekv.bounds import checks

walk_mod = importlib.import_module("balancekv.reference.walk")
sb_mod = importlib.import_module("balancekv.reference.softmax_balance")


def _coin_batch(U, uniforms, c):
    """Fair coins, with the walk's own FAIL rule applied to them (|<w_{i-1}, u_i>| > c)."""
    U = np.asarray(U, np.float64)
    x = checks.coin_signs(uniforms)
    W = np.cumsum(x[:, :, None] * U[None], axis=1)  # (B, n, D) prefix sums
    g = np.einsum("bnd,nd->bn", W[:, :-1], U[1:])
    bad = np.abs(g) > c
    failed = np.where(bad.any(1), bad.argmax(1) + 1, -1).astype(np.int64)
    return x, failed, W[:, -1]


def _coin_gram(G, uniforms, c):
    x = checks.coin_signs(uniforms)
    return x, np.full(x.shape[0], -1, np.int64)


def _coin_incremental(K, V, uniforms, *, scale, c):
    return _coin_gram(None, uniforms, c)


@pytest.fixture
def coins(monkeypatch):
    monkeypatch.setattr(walk_mod, "self_balancing_walk_batch", _coin_batch)
    monkeypatch.setattr(walk_mod, "gram_walk_signs", _coin_gram)
    monkeypatch.setattr(sb_mod, "gram_walk_signs", _coin_gram)
    monkeypatch.setattr(sb_mod, "softmax_balance_signs_incremental", _coin_incremental)


@pytest.fixture
def zero(monkeypatch):
    def zero_stream(K, V, Q, *, t, scale, seed):
        return np.zeros((Q.shape[0], V.shape[1])), 2 * t, 0

    def zero_subgen(K, V, Q, *, t, s_num, m, scale, seed, trials):
        return np.zeros((trials, Q.shape[0], V.shape[1])), 0

    monkeypatch.setattr(checks, "balance_stream_estimate", zero_stream)
    monkeypatch.setattr(checks, "subgen_estimate", zero_subgen)


@pytest.mark.parametrize("check", ["walk_direction_check", "walk_fail_check", "softmax_balance_check"])
def test_walk_checks_fail_when_the_walk_is_fair_coins(coins, check):
    """Coins on the same uniforms: the algorithm side of each walk-based theorem check leaves its bound."""
    res = getattr(checks, check)(0)
    assert not res.algorithm.within, res.summary()
    assert res.algorithm.ratio > 1


@pytest.mark.parametrize("check", ["eq2_stream_check", "subgen_check"])
def test_estimator_checks_fail_when_the_estimator_is_zero(zero, check):
    """The zero estimator: the algorithm side of each estimator theorem check leaves its bound."""
    res = getattr(checks, check)(0)
    assert not res.algorithm.within, res.summary()
    assert res.algorithm.ratio > 1


def test_unmutated_checks_separate_cheaply():
    """Sanity for the fixtures above: without a mutation, the cheap checks separate algorithm and controls."""
    for check in (checks.subgen_check,):
        assert check(0).separates


def test_binomial_allowance_is_the_smallest_count_with_tail_below_alpha():
    """binomial_allowance(N, p) = min{k : P(Binomial(N, p) > k) <= 1e-6}, checked against scipy."""
    from scipy import stats

    for N, p in [(48, 0.05), (64, 0.05), (16, 0.1), (400, 0.05), (8, 0.001)]:
        k = checks.binomial_allowance(N, p)
        assert stats.binom.sf(k, N, p) <= checks.ALPHA < stats.binom.sf(k - 1, N, p)
    assert checks.binomial_allowance(10, 0.0) == 0 and checks.binomial_allowance(10, 1.0) == 10
