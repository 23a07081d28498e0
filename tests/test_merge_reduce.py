"""MergeAndReduce and balance-stream [BKV Alg. 1, Thm 3.1 / 3.4].

Bounds checked: merge_reduce_memory_bound (deterministic, every step) and
balance_stream_error_bound (Eq. 2 / Thm 3.4 with our constants; overall failure probability
delta per query, split over the B + 1 instances and the walk FAILs), the latter where it is
informative (kept tokens ~ n/16) beside the zero estimator and equal-memory uniform sampling,
which must break it (balancekv.bounds.checks). Seeds fixed.
"""

import numpy as np
import pytest
from balancekv.reference.merge_reduce import MergeAndReduce
from balancekv.reference.softmax_attention import attention

import balancekv
from balancekv.bounds import checks
from balancekv.bounds.balance import (
    balance_stream_theorem_t,
    merge_reduce_failure_probability,
    merge_reduce_memory_bound,
    merge_reduce_sum_error_bound,
)
from balancekv.bounds.walk import als_threshold
from balancekv.synthetic import make_kv


def test_memory_binary_counter_and_weights():
    rng = np.random.default_rng(0)
    t, n = 8, 300
    mr = MergeAndReduce(t, 4, 3, scale=0.5, rng=np.random.default_rng(1))
    K, V = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    for j in range(n):
        mr.add(K[j], V[j], j)
        m = j + 1
        assert mr.size <= merge_reduce_memory_bound(m, t)
        occupied = [lv is not None for lv in mr.levels]
        bits = [(m // t) >> l & 1 == 1 for l in range(len(occupied))]
        assert occupied == bits
    for l, lv in enumerate(mr.levels):
        if lv is not None:
            assert lv[0].shape[0] <= t
            np.testing.assert_allclose(lv[3], l * np.log(2))
    Kc, Vc, pos, lw = mr.contents()
    assert len(set(pos.tolist())) == pos.size and pos.min() >= 0 and pos.max() < n
    assert mr.fallbacks == 0


def test_memory_is_t_log_n_over_t_for_long_streams():
    t = 4
    for n in (64, 256, 1024):
        mr = MergeAndReduce(t, 2, 1, scale=1.0, rng=np.random.default_rng(n))
        mr.extend(np.random.default_rng(0).normal(size=(n, 2)), np.ones((n, 1)), range(n))
        assert mr.size <= t * (2 + np.log2(n / t))


@pytest.mark.slow
def test_eq2_bound_holds_where_zero_and_equal_memory_uniform_break_it():
    """[BKV] Thm 3.1/3.4 (Eq. 2), data-dependent form balance_stream_error_bound at delta = 1e-3: one
    balance-stream of n = 32 t + 8 tokens (t = 1024) keeps about 2t (m/n = 0.06) and every one of 8 queries is
    within the bound; no walk falls back (the bound assumes none). Regime: the value mass sits on 8 heavy tokens
    (an exact bucket) over a near-uniform softmax, so the bound is 0.7 ||Attn||. Controls: the zero estimator
    (error ||Attn||, ratio 1.45) and uniform sampling of as many tokens (misses or over-weights the heavy ones,
    ratio 2.5) must exceed it. At this size the walk at the theorem's c is coin-like and the bound is looser
    than coins: this test guards the estimator (tests/test_mutations.py zeroes it), not the walk."""
    res = checks.eq2_stream_check(0)
    assert res.algorithm.within and res.algorithm.ratio < 1, res.summary()
    assert res.info["fallbacks"] == 0
    assert res.info["kept"] < res_n(res) / 10
    for ctl in res.controls:
        assert not ctl.within and ctl.ratio > 1, ctl.summary()


def res_n(res):
    return int(res.regime.split("n=")[1].split(",")[0])


def test_sum_error_bound_counts_reductions_and_failure_probability():
    """merge_reduce_sum_error_bound = sum_l N_l 2^l D with N_l = floor(n / (t 2^(l+1))) (here 16+8+4+2+1
    reductions, sum N_l 2^l = 80) and D = softmax_balance_bound at delta/R; the FAIL/fallback probability is
    R 4t e^{-c/4}; a c below 30 log(2t/delta) is refused with a ValueError naming c."""
    from balancekv.bounds.balance import softmax_balance_bound

    n, t = 32 * 64, 64
    D = softmax_balance_bound(1, 0.0, 0.0, 1.0, 1.0, als_threshold(2 * t, 0.01), 0.01 / 93)
    assert merge_reduce_sum_error_bound(n, t, 1, 0.0, 0.0, 1.0, 1.0, 0.01) == pytest.approx(80 * D)
    c = als_threshold(2 * t, 0.01)
    assert merge_reduce_failure_probability(n, t) == pytest.approx(31 * 4 * t * np.exp(-c / 4))
    with pytest.raises(ValueError, match="c = 40"):
        merge_reduce_sum_error_bound(n, t, 1, 0.0, 0.0, 1.0, 1.0, 0.01, c=40.0)


def test_theorem_t_reaches_eps_exactly_and_is_minimal():
    """balance_stream_theorem_t: for the returned t the worst-case Eq. 2 budget, with the erasure term divided by
    the estimate Z - E_Z (not Z), is at most eps ||softmax||_2 ||V||_F; the next smaller t does not meet it.
    The earlier rule (erasure / Z) gave eps (1 + eps/4); theorem mode refuses a c below the walk theorem's."""
    from balancekv.bounds.balance import balance_stream_failure_split, value_norm_bucket

    rng = np.random.default_rng(0)
    n, d = 1 << 16, 2
    K = 0.02 * rng.normal(size=(n, d))
    V = 2.0 + 0.1 * rng.uniform(size=(n, 1))
    eps, delta, scale = 0.9, 0.01, 1 / np.sqrt(d)
    t = balance_stream_theorem_t(K, V, eps, scale=scale, delta=delta)
    assert t is not None and t < n
    vn = np.linalg.norm(V, axis=1)
    r = np.linalg.norm(K, axis=1).max()
    zlow = n * np.exp(-scale * r * r)
    x = eps * np.sqrt((vn**2).sum()) / np.sqrt(n)  # eps * ||V||_F / sqrt(n) <= eps ||softmax||_2 ||V||_F
    b = value_norm_bucket(vn)
    dinst = balance_stream_failure_split(delta, len(np.unique(b)) + 1)

    def total(tt):
        en = sum(
            merge_reduce_sum_error_bound(int((b == u).sum()), tt, 1, r, r, vn[b == u].max(), scale, dinst)
            for u in np.unique(b)
        )
        ez = merge_reduce_sum_error_bound(n, tt, 1, r, r, 1.0, scale, dinst)
        return ((eps / 2) * (x / eps) * zlow + en + vn.max() * ez) / (zlow - ez) if ez < zlow else np.inf

    assert total(t) <= x
    assert not total(t // 2) <= x
    with pytest.raises(ValueError, match="c = 5"):
        balance_stream_theorem_t(K, V, eps, scale=scale, delta=delta, c=5.0)
    Kb, Vb = K[None, :4096], V[None, :4096]
    with pytest.raises(ValueError, match="c = 5"):
        balancekv.compress(Kb, Vb, eps, method="balance-stream", guarantee="theorem", c=5.0, seed=0)


def test_stream_two_set_layout_append_and_reproducible():
    K, V, Q = make_kv("bounded", heads=2, n=256, d=8, q=4, seed=0)
    a = balancekv.compress(K, V, keep=0.3, method="balance-stream", seed=4, variant="theory")
    b = balancekv.compress(K, V, keep=0.3, method="balance-stream", seed=4, variant="theory")
    np.testing.assert_array_equal(a.positions, b.positions)
    nl, dl = a.num_logw, a.den_logw
    both = np.isfinite(nl) & np.isfinite(dl)  # numerator slots in the denominator only with the guard weight
    assert np.all(dl[both] <= np.log(1e-12) + 1e-9)
    assert not a.single_set
    k2, v2, _ = make_kv("bounded", heads=2, n=40, d=8, q=1, seed=9)
    a.append(k2, v2)
    assert a.n_seen == 296
    pos = a.positions
    for h in range(2):
        p = pos[h][np.isfinite(a.den_logw[h])]
        assert len(set(p.tolist())) == p.size and p.max() == 295 and p.min() >= 0
    assert np.all(np.isfinite(a.attend(Q)))


def test_theory_variant_over_the_keep_budget_warns():
    """``keep`` is an upper bound for every token-selecting build except the theorem's MergeAndReduce, whose size is
    random (README, the budget): such a build is returned as it ran, with a :class:`balancekv.KeepBudgetWarning` and
    ``diagnostics["over_budget"]`` -- never silently. Control: the default variant at the same keep holds at most
    ``ceil(keep n)`` tokens and does not warn."""
    import math
    import warnings

    rng = np.random.default_rng(6)
    K = 0.3 * rng.normal(size=(2, 1024, 32))
    V = rng.normal(size=(2, 1024, 32)) + rng.normal(size=(2, 1, 32))
    with pytest.warns(balancekv.KeepBudgetWarning, match="variant=theory"):
        c = balancekv.compress(K, V, keep=0.1, method="balance-stream", variant="theory", seed=0)
    ob = c.diagnostics["over_budget"]
    assert ob["budget"] == math.ceil(0.1 * 1024) and ob["kept"] > ob["budget"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", balancekv.KeepBudgetWarning)
        d = balancekv.compress(K, V, keep=0.1, method="balance-stream", seed=0)
    assert "over_budget" not in d.diagnostics and d.kept().max() <= math.ceil(0.1 * 1024)


def test_fail_falls_back_to_exact_storage():
    """c tiny: every walk FAILs, every set is kept exactly, the estimate equals exact attention."""
    K, V, Q = make_kv("gaussian", heads=1, n=64, d=4, q=3, seed=1)
    ckv = balancekv.compress(K, V, keep=0.25, method="balance-stream", seed=0, c=1e-6, max_retries=2, variant="theory")
    d = ckv.diagnostics
    assert d["fallbacks"] > 0 and d["retries"] == 2 * d["fallbacks"]
    np.testing.assert_allclose(ckv.attend(Q), attention(Q, K, V), rtol=1e-9, atol=1e-12)


def test_erasure_budget_and_theorem_mode():
    """Mechanics of guarantee="theorem": it compresses, and the erased squared norm stays within (eps/2)^2 of
    the total. Its Eq. 2 assertion at eps = 0.9 is weak here (zero-mean values: the zero estimator meets it
    too); the informative Eq. 2 check with controls is
    test_eq2_bound_holds_where_zero_and_equal_memory_uniform_break_it."""
    rng = np.random.default_rng(0)
    n, d = 4096, 4
    K = 0.1 * rng.normal(size=(1, n, d))
    V = rng.normal(size=(1, n, 1)) * np.where(rng.random((1, n, 1)) < 0.2, 0.01, 1.0)
    eps = 0.9
    ckv = balancekv.compress(K, V, eps, method="balance-stream", guarantee="theorem", seed=0)
    assert ckv.diagnostics["theorem_exact"] is False
    assert ckv.kept()[0] < n
    st = ckv._stream.stream
    assert st.erased_sq[0] <= (eps / 2) ** 2 * st.total_sq[0] + 1e-12
    # Eq. 2 at the probe queries: ||z - Attn|| <= eps ||softmax||_2 ||V||_F
    Q = K[:, -8:]
    z, ex = ckv.attend(Q), attention(Q, K, V)
    a = (Q @ K[0].T)[0] / np.sqrt(d)
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rhs = eps * np.linalg.norm(p, axis=-1) * np.linalg.norm(V)
    assert np.all(np.linalg.norm(z - ex, axis=-1)[0] <= rhs)


@pytest.mark.slow
def test_theorem_mode_meets_eq2_where_the_zero_estimator_does_not():
    """guarantee="theorem" end to end ([BKV] Thm 3.1 via balance_stream_theorem_t, Eq. 2 at eps = 0.5 with
    overall failure probability delta = 0.01 per query): n = 16384 tokens with values 2 + 0.1 U(0,1) (so
    eps ||softmax||_2 ||V||_F is 0.5 ||Attn||) and small keys; the certified t = 2048 compresses to 9180 tokens
    with no fallback, and at 8 probe queries ||z - Attn|| is 0.12 of the Eq. 2 right side. Control: the zero
    estimator (error ||Attn||) is at 2.0x. (Equal-memory uniform sampling meets Eq. 2 here too: at these sizes
    the theorem's t is far above what sampling needs, see proofs/merge_and_reduce.md.)"""
    rng = np.random.default_rng(0)
    n, d, eps = 1 << 14, 2, 0.5
    K = 0.02 * rng.normal(size=(1, n, d))
    V = 2.0 + 0.1 * rng.uniform(size=(1, n, 1))
    ckv = balancekv.compress(K, V, eps, method="balance-stream", guarantee="theorem", seed=0)
    assert ckv.diagnostics["theorem_exact"] is False and ckv.diagnostics["fallbacks"] == 0
    assert ckv.kept()[0] < 0.6 * n
    Q = K[:, -8:]
    z, ex = ckv.attend(Q), attention(Q, K, V)
    a = (Q @ K[0].T)[0] / np.sqrt(d)
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rhs = eps * np.linalg.norm(p, axis=-1) * np.linalg.norm(V)
    assert np.all(np.linalg.norm(z - ex, axis=-1)[0] <= rhs)
    assert np.all(np.linalg.norm(ex, axis=-1)[0] > rhs)  # the zero estimator violates Eq. 2


def test_theorem_mode_is_exact_when_bound_needs_every_token():
    K, V, _ = make_kv("llm", heads=1, n=128, d=16, q=1, seed=0)
    ckv = balancekv.compress(K, V, 0.1, method="balance-stream", guarantee="theorem", seed=0)
    assert ckv.diagnostics["theorem_exact"] is True and ckv.kept()[0] == 128
