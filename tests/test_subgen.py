"""SubGen [SUB] (SPEC section 5): reference sampler statistics, Thm 2.4 with our constants, the method.

Statistical tests use fixed seeds, so each is deterministic; the failure
probability stated in each docstring is the chance that a *random* seed would
fail a correct implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fast_helpers import planted_heavy_hitters
from balancekv.reference.softmax_attention import attention, relative_error, weighted_attention
from balancekv.reference.subgen import fold_scale, greedy_k_center, online_clusters, subgen_offline, subgen_stream
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import balancekv
from balancekv.api import no_query_probes, segments_attention
from balancekv.bounds.subgen import (
    stable_rank,
    subgen_combined_eps,
    subgen_denominator_fail_prob,
    subgen_denominator_samples,
    subgen_numerator_samples,
    subgen_sample_sizes,
    subgen_theorem_rhs,
)
from balancekv.methods import get_method
from balancekv.methods.base import Context
from balancekv.methods.subgen import state_segments
from balancekv.synthetic import make_kv

Z_CRIT = 5.5  # two-sided normal tail 3.8e-8 per coordinate


def clustered_stream(rng, m, n, d, width, sep=10.0, scale=1.0):
    """Keys ``(n, d)`` that are ``(m, width)``-clusterable after folding by ``scale``:
    ``m`` centres ``sep`` apart (folded), each key within ``width/2`` of its centre."""
    centres = sep * np.eye(max(m, d))[:m, :d] if m <= d else sep * rng.normal(size=(m, d))
    lab = rng.integers(0, m, size=n)
    lab[:m] = np.arange(m)
    u = rng.normal(size=(n, d))
    u *= (rng.random((n, 1)) ** (1 / d)) * (width / 2) / np.linalg.norm(u, axis=-1, keepdims=True)
    return (centres[lab] + u) / scale, lab


def replicate(x, R):
    return np.repeat(x[None], R, axis=0)


def exact_parts(q, K, V, scale):
    e = np.exp(scale * K @ q)
    return V.T @ e, e.sum(), e


# ---------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("variant", ["stream", "offline"])
def test_estimates_are_unbiased_and_numerator_variance_matches(variant):
    """E[N^] = N and E[Z^] = Z ([SUB] Sec. 3 estimators); E||N^ - N||^2 = (mu ||e||^2 - ||N||^2) / s_num
    (l2 sampling second moment, proofs/subgen.md). Averaged over R = 2000 independent heads, every
    coordinate lies within 5.5 standard errors: false-failure probability <= 11 * 3.8e-8 < 1e-6
    per variant (normal approximation of the mean of 2000 i.i.d. draws)."""
    rng = np.random.default_rng(7)
    n, d, s, R, scale = 40, 3, 4, 2000, 0.7
    K, _ = clustered_stream(rng, 4, n, d, width=1.5, sep=3.0, scale=scale)
    V = rng.normal(size=(n, s))
    V[5] = 0.0  # a zero-norm value: never sampled, contributes nothing
    q = rng.normal(size=d) * 0.5
    t, s_num = 3, 3
    if variant == "stream":
        state = subgen_stream(replicate(K, R), replicate(V, R), t=t, s_num=s_num, threshold=1.5, scale=scale, rng=rng)
    else:
        state = subgen_offline(replicate(K, R), replicate(V, R), t=t, s_num=s_num, m=4, scale=scale, rng=rng)
    assert any(c.members is None for c in state.heads[0].clusters), "need a cluster in reservoir mode"
    N_hat, Z_hat = state.estimate(replicate(q[None], R))
    N_hat, Z_hat = N_hat[:, 0], Z_hat[:, 0]
    N, Z, e = exact_parts(q, K, V, scale)
    for est, exact in [(N_hat[:, j], N[j]) for j in range(s)] + [(Z_hat, Z)]:
        se = est.std(ddof=1) / np.sqrt(R)
        assert abs(est.mean() - exact) <= Z_CRIT * se, (est.mean(), exact, se)
    sq_err = np.sum((N_hat - N) ** 2, axis=-1)
    mu = np.sum(V * V)
    expected = (mu * np.sum(e * e) - N @ N) / s_num
    assert abs(sq_err.mean() - expected) <= Z_CRIT * sq_err.std(ddof=1) / np.sqrt(R), (sq_err.mean(), expected)


# ---------------------------------------------------------------------- slot distributions
@pytest.mark.parametrize("variant", ["stream", "offline"])
def test_reservoir_slots_uniform_and_l2_slots_follow_norms(variant):
    """Each reservoir slot of a cluster with n_c members holds each member w.p. 1/n_c, and each numerator
    slot holds token i w.p. ||v_i||^2 / mu (SPEC 5); slots are independent, so slot counts over R heads are
    multinomial. Chi-square test at p = 1e-6 each: false-failure probability <= 2e-6. Zero-norm values:
    never sampled (deterministic)."""
    rng = np.random.default_rng(3)
    n, d, s, R, t, s_num = 12, 2, 3, 1500, 5, 4
    K = rng.normal(size=(n, d)) * 0.01  # one cluster (threshold inf / one centre)
    V = rng.normal(size=(n, s)) * rng.uniform(0.3, 2.0, size=(n, 1))
    V[[2, 7]] = 0.0
    if variant == "stream":
        state = subgen_stream(replicate(K, R), replicate(V, R), t=t, s_num=s_num, threshold=np.inf, scale=1.0, rng=rng)
    else:
        state = subgen_offline(replicate(K, R), replicate(V, R), t=t, s_num=s_num, m=1, scale=1.0, rng=rng)
    res = np.concatenate([h.clusters[0].slot_pos for h in state.heads])
    assert all(h.m == 1 and h.clusters[0].count == n for h in state.heads)
    counts = np.bincount(res, minlength=n)
    assert stats.chisquare(counts).pvalue > 1e-6, counts
    num = np.concatenate([h.num_pos for h in state.heads])
    assert np.all(num >= 0)
    counts = np.bincount(num, minlength=n)
    assert counts[2] == 0 and counts[7] == 0
    sq = np.sum(V * V, axis=-1)
    pos = sq > 0
    expected = sq[pos] / sq.sum() * num.size
    assert stats.chisquare(counts[pos], expected).pvalue > 1e-6, (counts, expected)


# ---------------------------------------------------------------------- clusterable streams
@settings(max_examples=8, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000))
def test_online_clustering_opens_at_most_m_centres(m, seed):
    """If the folded keys are (m, delta)-clusterable, threshold delta opens at most m clusters and every
    member is within delta of its centre ([SUB] Sec. 3; proofs/subgen.md, 'threshold rule')."""
    rng = np.random.default_rng(seed)
    scale = 0.3
    K, _ = clustered_stream(rng, m, 300, 4, width=0.5, sep=1.0 + rng.random(), scale=scale)
    centres, assign, dist = online_clusters(fold_scale(K, scale), 0.5)
    assert 1 <= centres.size <= m
    assert dist.max() <= 0.5
    state = subgen_stream(K[None], K[None], t=2, s_num=2, threshold=0.5, scale=scale, rng=rng)
    assert state.heads[0].m == centres.size


def test_memory_flat_as_stream_grows_tenfold():
    """On a clusterable stream the SubGen state (centres, t slots per cluster, s_num slots) stops growing
    once every cluster holds more than t tokens: the same size at n and at 10 n, and so do the kept slots
    of the CompressedKV fed token by token through append (SPEC 5: memory O(d (m t + s_num)))."""
    rng = np.random.default_rng(5)
    m, d, n0 = 4, 8, 200
    K, _ = clustered_stream(rng, m, 10 * n0, d, width=0.4, sep=4.0, scale=1 / np.sqrt(d))
    V = rng.normal(size=(10 * n0, d))
    c = balancekv.compress(
        K[None, :n0], V[None, :n0], keep=0.25, method="subgen", variant="stream", threshold=0.4, seed=1, estimator="l2"
    )
    info = c.diagnostics["level_info"][0]
    assert info["clusters"] == [m]
    floats0 = info["state_floats"][0]
    kept0 = int(c.kept().max())
    assert kept0 <= 0.25 * n0
    for j in range(n0, n0 + 60):  # token by token
        c.append(K[None, j : j + 1], V[None, j : j + 1])
    for j in range(n0 + 60, 10 * n0, 60):
        c.append(K[None, j : j + 60], V[None, j : j + 60])
    assert c.n_seen == 10 * n0
    state = c._stream.stream.state
    assert state.heads[0].m == m
    assert state.stored_floats()[0] <= floats0
    assert int(c.kept().max()) <= info["s_num"] + m * info["t"][0]  # slots; distinct tokens vary with duplicates
    assert np.all(np.isfinite(c.attend(K[None, -3:])))


def test_chunked_and_token_by_token_appends_agree():
    """The streaming layout draws (H, t_max + s_num) uniforms per token, so one chunk and T single-token
    appends from the same generator state give the same sketch (deterministic)."""
    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(2, 50, 4)), rng.normal(size=(2, 50, 3))
    a = subgen_stream(K, V, t=[3, 4], s_num=5, threshold=1.0, scale=0.5, rng=np.random.default_rng(9))
    b = subgen_stream(
        K[:, :1], V[:, :1], t=[3, 4], s_num=5, threshold=1.0, scale=0.5, rng=(g := np.random.default_rng(9))
    )
    for j in range(1, 50):
        b.append(K[:, j : j + 1], V[:, j : j + 1], [j], rng=g)
    for x, y in zip(a.padded(), b.padded()):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------- Thm 2.4
def test_theorem_2_4_holds_where_zero_and_equal_memory_uniform_break_it():
    """[SUB] Thm 2.4 with our constants (subgen_sample_sizes at eps = 0.4, delta = 0.1; proofs/subgen.md):
    per query P(||z - Attn|| > eps ||softmax||_2 ||V||_op) <= delta; over 16 independent sketches x 4 queries
    every query's exceedance count is within the Binomial(16, 0.1) allowance. Regime: n = 16384 tokens in two
    tight key clusters, value mass on 8 tokens that hold ~1/4 of the attention, so the right side is
    0.41 ||Attn|| and s_num + m t = 1269 = 0.08 n (9 distinct tokens kept). Controls: the zero estimator and
    uniform sampling of 1269 tokens (it misses the 8 heavy tokens or over-weights them) must exceed it.
    Measured: SubGen 0.03 of the bound, zero 2.4, uniform 2.4."""
    from balancekv.bounds import checks

    res = checks.subgen_check(0)
    assert res.algorithm.within and res.algorithm.ratio < 1, res.summary()
    assert res.info["s_num"] + 2 * res.info["t"] < 16384 / 10
    for ctl in res.controls:
        assert not ctl.within and ctl.ratio > 1, ctl.summary()


def test_theorem_2_4_bound_holds_with_stated_probability():
    """[SUB] Thm 2.4, second regime (near-uniform softmax, Gaussian values): with t, s_num from the bound at
    eps = 0.6 and failure probability delta = 0.2, a query with ||q|| <= r = 1 gets ||z - Attn|| <= eps
    ||softmax||_2 ||V||_op w.p. >= 0.8; over R = 150 runs the failures exceed 54 with probability < 1e-6.
    Here the zero estimator would also pass (rhs > ||Attn||): the informative check is the test above."""
    rng = np.random.default_rng(11)
    n, d, s, R, eps, delta = 120, 4, 2, 150, 0.6, 0.2
    scale = 1 / np.sqrt(d)
    K, _ = clustered_stream(rng, 3, n, d, width=0.2, sep=2.0, scale=scale)
    V = rng.normal(size=(n, s))
    q = rng.normal(size=d)
    q *= 1.0 / np.linalg.norm(q)
    centres, assign, dist = online_clusters(fold_scale(K, scale), 0.2)
    t, s_num = subgen_sample_sizes(eps, 1.0, dist.max(), centres.size, stable_rank(V), delta)
    assert t < n / 3  # clusters go to reservoir mode
    state = subgen_stream(replicate(K, R), replicate(V, R), t=t, s_num=s_num, threshold=0.2, scale=scale, rng=rng)
    pos, Ks, Vs, nl, dl = state.padded()
    z = weighted_attention(replicate(q[None], R), Ks, Vs, nl, dl, scale)[:, 0]
    exact = attention(q[None], K, V, scale)[0]
    rhs = subgen_theorem_rhs(q[None], K, V, eps, scale)[0]
    fails = int(np.sum(np.linalg.norm(z - exact, axis=-1) > rhs))
    assert stats.binom.sf(fails - 1, R, delta) > 1e-6, fails


def test_bound_functions_explicit_values():
    """The formulas of proofs/subgen.md evaluated by hand."""
    # t = ceil((e^{2 r rho} - 1)^2 ln(2 m / delta) / (2 eps^2)), r rho = 0.5, m = 3, delta = 0.1, eps = 0.2
    assert subgen_denominator_samples(0.2, 1.0, 0.5, 3, 0.1) == int(np.ceil((np.e - 1) ** 2 * np.log(60) / 0.08))
    assert subgen_denominator_samples(0.2, 1.0, 0.0, 3, 0.1) == 1  # identical keys in a cluster: exact
    # large spread: [SUB]'s multiplicative Chernoff form 3 e^{2 r rho} ln(2m/delta) / eps^2 binds (r rho = 2)
    chern = int(np.ceil(3 * np.exp(4.0) * np.log(60) / 0.04))
    assert chern < (np.exp(4.0) - 1) ** 2 * np.log(60) / 0.08
    assert subgen_denominator_samples(0.2, 1.0, 2.0, 3, 0.1) == chern
    assert subgen_denominator_fail_prob(chern, 0.2, 1.0, 2.0, 3) <= 0.1
    # s = ceil(srank / (delta eps^2)) = ceil(2 / (0.1 * 0.04)) = 500
    assert subgen_numerator_samples(0.2, 2.0, 0.1) == 500
    assert subgen_combined_eps(1 / 3, 1 / 3) == pytest.approx(1.0)
    # split eps/3, delta/2: eps = 0.75, delta = 0.5, srank 1 -> s = 1 / (0.25 * 0.25^2) = 64
    t, s = subgen_sample_sizes(0.75, 1.0, 0.5, 3, 1.0, 0.5)
    assert (t, s) == (subgen_denominator_samples(0.25, 1.0, 0.5, 3, 0.25), 64)
    with pytest.raises(ValueError, match="eps"):
        subgen_sample_sizes(1.5, 1.0, 0.5, 3, 2.0, 0.2)


# ---------------------------------------------------------------------- the compressed cache
@pytest.mark.parametrize("variant", ["stream", "offline"])
def test_segments_estimate_equals_slot_formulas(variant):
    """The CompressedKV built from the sketch (log-weights log(mu/(s_num||v||^2)), log(n_c/t), 0 for small
    clusters, duplicates merged, -inf padding) gives exactly N^/Z^ of SPEC 5's formulas."""
    K, V, Q = make_kv("clustered", heads=3, n=150, d=8, q=4, seed=2)
    rng = np.random.default_rng(4)
    scale = 1 / np.sqrt(8)
    if variant == "stream":
        state = subgen_stream(K, V, t=[2, 5, 9], s_num=7, threshold=0.05, scale=scale, rng=rng)
    else:
        state = subgen_offline(K, V, t=[2, 5, 9], s_num=7, m=10, scale=scale, rng=rng)
    segs = state_segments(state)
    z = segments_attention(segs, Q, scale)
    N, Z = state.estimate(Q)
    np.testing.assert_allclose(z, N / Z[..., None], rtol=1e-10, atol=1e-12)
    pos = segs[0].positions
    valid = segs[0].valid()
    assert np.all(pos[~valid] == -1) and np.all(pos[valid] >= 0)
    for h in range(3):  # distinct tokens, sorted
        p = pos[h][valid[h]]
        assert np.all(np.diff(p) > 0)


def test_translation_invariance_and_determinism():
    """Softmax is invariant to translating all keys (SPEC 0); SubGen clusters by distances, so the same seed
    gives the same estimate for K and K + c; the same seed gives the same cache; inputs are not modified."""
    K, V, Q = make_kv("gaussian", heads=2, n=96, d=8, q=4, seed=3)
    K0, V0 = K.copy(), V.copy()
    c = np.random.default_rng(0).normal(size=8) * 3
    for variant in ("stream", "offline"):
        a = balancekv.compress(K, V, keep=0.25, method="subgen", variant=variant, seed=5)
        b = balancekv.compress(K + c, V, keep=0.25, method="subgen", variant=variant, seed=5)
        a2 = balancekv.compress(K, V, keep=0.25, method="subgen", variant=variant, seed=5)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_allclose(a.attend(Q), b.attend(Q + 0 * c), rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(a.attend(Q), a2.attend(Q))
    np.testing.assert_array_equal(K, K0)
    np.testing.assert_array_equal(V, V0)


def test_keep_budget_is_honest():
    """level_for_keep: s_num = round(num_frac B) numerator slots plus at most B - s_num denominator slots,
    so kept tokens <= keep * n (module docstring of balancekv.methods.subgen)."""
    K, V, _ = make_kv("gaussian", heads=2, n=256, d=8, seed=1)
    for variant in ("offline", "stream"):
        for keep in (0.5, 0.25, 0.1):
            c = balancekv.compress(K, V, keep=keep, method="subgen", variant=variant, seed=0, estimator="l2")
            assert np.all(c.kept() <= round(keep * 256)), (variant, keep, c.kept())
            assert not c.single_set
    meth = get_method("subgen")
    opts = meth.resolve_options({"estimator": "l2"})
    levels = meth.levels(256, opts)
    budgets = [lv["s_num"] + lv["m"] * lv["t"] for lv in levels]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] <= 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap", [None, 128])
def test_half_precision_cache_holds_its_tokens_once_in_their_dtype(dtype, cap):
    """A bf16/fp16 SubGen cache holds its sampled tokens once, in the input's dtype: about half the bytes of the
    float32 cache of the same tokens (it held a float32 sketch beside bf16 copies of its segments: 1.46x the float32
    cache's bytes, ratio 0.79 at keep 0.25), and still after decode appends (the window's new tokens are stored in
    its dtype); its estimate is the float32 cache's up to the storage rounding."""
    g = torch.Generator().manual_seed(0)
    K, V = 0.5 * torch.randn(2, 512, 32, generator=g), torch.randn(2, 512, 32, generator=g) + 1
    kw = dict(cap=cap) if cap else dict(keep=0.25)
    c32 = balancekv.compress(K, V, method="subgen", seed=0, **kw)
    c16 = balancekv.compress(K.to(dtype), V.to(dtype), method="subgen", seed=0, **kw)
    assert c16.nbytes <= 0.6 * c32.nbytes, (c16.nbytes, c32.nbytes)
    Q = K[:, -8:]
    np.testing.assert_allclose(c16.attend(Q.to(dtype)).float(), c32.attend(Q), atol=0.05, rtol=0.05)
    before = c16.nbytes
    for i in range(40):
        c16.append(K[:, i : i + 1].to(dtype), V[:, i : i + 1].to(dtype))
    assert c16.nbytes == before and c16.keys.dtype == dtype


def test_numpy_sketch_is_held_once_in_the_callers_dtype():
    """NumPy float16 input runs the reference, whose sketch now holds its sampled tokens in float16 and whose padded
    segments are built per read, not kept: the bytes held (walking the object graph) equal ``nbytes`` and are within
    1.15x of the torch path's. Before, the float64 sketch sat beside float16 segments: 0.85 of the full cache at
    keep 0.25 (torch: 0.27)."""
    from _memory import reachable_array_bytes

    rng = np.random.default_rng(0)
    K = (0.5 * rng.standard_normal((2, 400, 32))).astype(np.float16)
    V = rng.standard_normal((2, 400, 32)).astype(np.float16)
    Q = (0.5 * rng.standard_normal((2, 8, 32))).astype(np.float16)
    c = balancekv.compress(K, V, keep=0.25, method="subgen", seed=0)
    t = balancekv.compress(torch.from_numpy(K), torch.from_numpy(V), keep=0.25, method="subgen", seed=0)
    held = lambda: reachable_array_bytes(c, stop=(c.diagnostics,)) - c.nbytes  # (+16: the stream rng's seed)
    assert "fallback" not in c.diagnostics and 0 <= held() <= 64
    assert c.nbytes <= 1.15 * t.nbytes and c.ratio < 0.4
    before = c.attend(Q)
    c.append(K[:, :40], V[:, :40])  # the stream keeps working, still held once
    assert 0 <= held() <= 64 and c.ratio < 0.4
    assert np.isfinite(before).all() and np.isfinite(c.attend(Q)).all()


def test_never_larger_than_the_exact_cache_in_the_callers_dtype(monkeypatch):
    """No cache holds more than the exact cache of the same input, by the bytes held in the caller's dtype. Forced
    here by a reference sketch that keeps float64 tokens for float16 input (``hold_tokens_as`` a no-op, what the
    reference did before): at keep 0.5 that holds more than the exact cache, so the build is replaced by
    StreamingLLM at the keep budget, said in the diagnostics. Control: without the patch it compresses."""
    from balancekv.reference import subgen as ref_subgen

    rng = np.random.default_rng(0)
    K = (0.5 * rng.standard_normal((2, 200, 32))).astype(np.float16)
    V = rng.standard_normal((2, 200, 32)).astype(np.float16)
    exact = balancekv.compress(K, V, keep=1.0, method="subgen").nbytes
    ok = balancekv.compress(K, V, keep=0.5, method="subgen", seed=0)
    assert "fallback" not in ok.diagnostics and ok.nbytes < 0.8 * exact
    monkeypatch.setattr(ref_subgen.SubGenState, "hold_tokens_as", lambda self, kd, vd: None)
    c = balancekv.compress(K, V, keep=0.5, method="subgen", seed=0)
    assert c.nbytes <= exact and c.diagnostics["fallback"] == "streaming"
    assert "more than the exact cache" in c.diagnostics["fallback_reason"]
    assert c.kept().max() <= 100  # never over the keep budget either


def test_eps_mode_meets_eps_on_probes():
    """Empirical mode: each head's chosen level has mean probe error <= eps (SPEC 8); on easy data (small
    logits, values near a common vector) SubGen compresses every head, and decoding appends keep working."""
    rng = np.random.default_rng(4)
    K = 0.3 * rng.normal(size=(2, 256, 8))
    V = 1.0 + 0.1 * rng.normal(size=(2, 256, 8))
    for variant in ("offline", "stream"):
        c = balancekv.compress(K, V, 0.1, method="subgen", variant=variant, seed=0)
        probes = no_query_probes(K, 0)  # without queries: probes fitted to the keys, drawn from the seed
        err = relative_error(c.attend(probes), attention(probes, K, V)).mean(axis=-1)
        assert np.all(c.diagnostics["margin"] * err <= 0.1 + 1e-12)  # margin x probe error meets eps
        np.testing.assert_allclose(err, c.diagnostics["error_per_head"], rtol=1e-9)
        assert np.all(c.diagnostics["level_per_head"] > 0) and np.all(c.kept() < 256)
        c.append(K[:, :4], V[:, :4])
        assert np.all(np.isfinite(c.attend(probes)))


def test_theorem_mode_exact_when_bound_needs_everything_and_compresses_when_easy():
    """guarantee='theorem': Gaussian data needs more samples than tokens (exact result, said so); a single
    tight cluster with rank-one values (srank 1) and eps = 0.5 needs t = 1 and s_num = ceil(1/(delta/2 (eps'/3)^2))
    slots, fewer than n = 3000 (bound from balancekv.bounds.subgen_sample_sizes)."""
    K, V, _ = make_kv("gaussian", heads=1, n=128, d=8, seed=0)
    c = balancekv.compress(K, V, 0.2, method="subgen", guarantee="theorem", seed=0)
    assert c.diagnostics["theorem_exact"] and int(c.kept()[0]) == 128
    rng = np.random.default_rng(0)
    n, d = 3000, 4
    K = 1e-4 * rng.normal(size=(1, n, d))
    V = np.ones((1, n, 2)) * rng.uniform(0.5, 1.5, size=(1, n, 1))
    meth = get_method("subgen")
    ctx = Context(scale=0.5, rng=rng, probes=K[:, -8:], delta=0.5, opts=meth.resolve_options({"variant": "stream"}))
    level = meth.theorem_level(K, V, 0.5, ctx)
    assert level is not None and level["t"] == 1 and level["s_num"] < n
    c = balancekv.compress(K, V, 0.5, method="subgen", guarantee="theorem", delta=0.5, variant="stream", seed=0)
    assert not c.diagnostics["theorem_exact"] and int(c.kept()[0]) < n


@pytest.mark.parametrize("variant", ["stream", "offline"])
def test_theorem_mode_on_torch_certifies_the_reference_level(variant):
    """guarantee='theorem' with torch input runs on torch (it raised a TypeError: NumPy code on tensors) and
    certifies the level the NumPy reference certifies (float64: the same constants, clusters and sizes)."""
    rng = np.random.default_rng(0)
    n, d = 3000, 4
    K = 1e-4 * rng.normal(size=(2, n, d))
    V = np.ones((2, n, 2)) * rng.uniform(0.5, 1.5, size=(2, n, 1))
    got = {}
    for kind in ("numpy", "torch"):
        Ki, Vi = (torch.from_numpy(K), torch.from_numpy(V)) if kind == "torch" else (K, V)
        c = balancekv.compress(Ki, Vi, 0.5, method="subgen", guarantee="theorem", delta=0.5, variant=variant, seed=0)
        assert isinstance(c.keys, torch.Tensor) == (kind == "torch")
        got[kind] = (c.diagnostics["levels"], c.diagnostics["theorem_exact"])
    assert got["torch"] == got["numpy"] and not got["numpy"][1]


# ---------------------------------------------------------------------- edge cases
def test_zero_values_single_cluster_and_single_token():
    """V = 0: numerator empty, estimate exactly 0 (no NaN). One token: the cache is exact. A single cluster
    (threshold inf): one centre, finite estimates. Keys of norm 1e4 in one tight cluster: stable
    exponentials, and the same estimate as the keys translated to the origin."""
    rng = np.random.default_rng(1)
    K = rng.normal(size=(2, 50, 4))
    for variant in ("stream", "offline"):
        c = balancekv.compress(K, np.zeros((2, 50, 3)), keep=0.2, method="subgen", variant=variant, seed=0)
        out = c.attend(K[:, :3])
        assert np.all(out == 0.0)
        K1, V1 = rng.normal(size=(1, 1, 4)), rng.normal(size=(1, 1, 3))
        c1 = balancekv.compress(K1, V1, keep=1.0, method="subgen", variant=variant, seed=0)
        Q1 = rng.normal(size=(1, 2, 4))
        np.testing.assert_allclose(c1.attend(Q1), attention(Q1, K1, V1), rtol=1e-12)
        c1.append(K1, V1)  # a duplicate token after n = 1
        assert np.all(np.isfinite(c1.attend(Q1)))
    c = balancekv.compress(
        K, rng.normal(size=(2, 50, 3)), keep=0.3, method="subgen", variant="stream", threshold=1e9, seed=0
    )
    assert c.diagnostics["level_info"][0]["clusters"] == [1, 1]
    assert np.all(np.isfinite(c.attend(K[:, :3])))
    offset = 1e4 * rng.normal(size=4) / 2
    Ks = rng.normal(size=(1, 64, 4))
    Vb = 1e4 * rng.normal(size=(1, 64, 4))
    Qb = rng.normal(size=(1, 3, 4))
    cb = balancekv.compress(Ks + offset, Vb, keep=0.5, method="subgen", seed=0)
    cs = balancekv.compress(Ks, Vb, keep=0.5, method="subgen", seed=0)
    out = cb.attend(Qb)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, cs.attend(Qb), rtol=1e-6)


def test_greedy_k_center_assigns_nearest_and_finds_separated_clusters():
    """Gonzalez k-centre: assign = nearest centre (brute force), and on m well-separated groups its m
    centres hit every group (radius <= 2 OPT < separation / 2)."""
    rng = np.random.default_rng(2)
    X, lab = clustered_stream(rng, 5, 200, 6, width=0.2, sep=5.0)
    centres, assign, dist = greedy_k_center(X, 5)
    D = np.linalg.norm(X[:, None] - X[centres][None], axis=-1)
    np.testing.assert_allclose(dist, D.min(axis=1))
    np.testing.assert_array_equal(D[np.arange(200), assign], D.min(axis=1))
    assert sorted(lab[centres].tolist()) == list(range(5))
    c2, _, d2 = greedy_k_center(np.zeros((7, 3)), 4)  # coincident points: one centre
    assert c2.tolist() == [0] and np.all(d2 == 0)


@pytest.mark.parametrize(
    "opts, err",
    [
        ({"variant": "fast"}, ValueError),
        ({"m": 0}, ValueError),
        ({"threshold": -1.0}, ValueError),
        ({"num_frac": 1.0}, ValueError),
        ({"t": "a"}, TypeError),
        ({"s_num": 0}, ValueError),
        ({"delta_c": 1.0}, TypeError),
    ],
)
def test_bad_options_are_rejected(opts, err):
    K, V, _ = make_kv("gaussian", heads=1, n=32, d=4, seed=0)
    with pytest.raises(err, match=next(iter(opts))):
        balancekv.compress(K, V, keep=0.5, method="subgen", **opts)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_heavy_hitters_are_exact_and_the_sample_stands_for_the_rest(kind):
    """With observed queries, subgen keeps ``heavy_frac`` of the budget as the middle's heavy hitters (largest summed
    probe attention), exactly, and its one-stratum sample stands for the rest of the middle only. Checked: every
    planted token the probes read is held in the heavy segment; every held slot's key is its position's input row
    (the sketch built on the middle without them reports the cache's positions); the sample's weights sum to the
    size of the rest (each middle token counted once, the unbiased total: counting the heavy hitters in the sample
    too would make it the whole middle); and on fresh queries like the probes the error is far below the same
    budget without heavy hitters (control ``heavy_frac=0``)."""
    K, V, Qp, Qt, P = planted_heavy_hitters()
    conv = (lambda x: torch.from_numpy(x)) if kind == "torch" else (lambda x: x)
    n = K.shape[1]
    c = balancekv.compress(conv(K), conv(V), keep=0.25, queries=conv(Qp), method="subgen", seed=0)
    info_heavy = round(0.3 * 128)
    segs = {sg.label: sg for sg in c.segments}
    hpos = np.asarray(segs["heavy"].positions.tolist())
    assert hpos.shape == (2, info_heavy) and all(np.isin(P, hpos[h]).all() for h in range(2))
    rest = n - 4 - round(0.4 * 128) - info_heavy
    for sg in c.segments:
        pos, ok = np.asarray(sg.positions.tolist()), np.asarray(sg.valid().tolist())
        keys = np.asarray(sg.keys.dense().tolist())
        for h in range(2):
            np.testing.assert_allclose(keys[h][ok[h]], K[h, pos[h][ok[h]]], rtol=0, atol=1e-6)
        if sg.label == "subgen":
            w = np.exp(np.asarray(sg.den_logw.tolist()))
            np.testing.assert_allclose(np.where(ok, w, 0).sum(-1), rest, rtol=1e-9)
    assert int(np.asarray(c.kept().tolist()).max()) <= 128
    off = balancekv.compress(conv(K), conv(V), keep=0.25, queries=conv(Qp), method="subgen", seed=0, heavy_frac=0.0)
    assert "heavy" not in {sg.label for sg in off.segments}
    exact = balancekv.attention(conv(Qt), conv(K), conv(V))
    err = lambda x: float(np.mean(np.asarray(balancekv.api.relative_error(x.attend(conv(Qt)), exact).tolist())))
    assert err(c) < 0.3 * err(off)


def test_heavy_hitters_need_queries():
    """Without observed queries there is nothing to rank by, so the heavy share goes to the sample (no heavy
    segment, the sample's slots grow by that share) and the build equals ``heavy_frac=0``'s."""
    K, V, _, Qt, _ = planted_heavy_hitters()
    a = balancekv.compress(K, V, keep=0.25, method="subgen", seed=0)
    b = balancekv.compress(K, V, keep=0.25, method="subgen", seed=0, heavy_frac=0.0)
    assert "heavy" not in {sg.label for sg in a.segments}
    np.testing.assert_array_equal(a.attend(Qt), b.attend(Qt))
    with pytest.raises(ValueError, match="heavy_frac"):
        balancekv.compress(K, V, keep=0.25, method="subgen", heavy_frac=1.0)


def test_sizes_and_kinds_the_heavy_hitters_must_not_break():
    """Regressions found in review. (1) A torch cache over a reference sketch (torch input, ``backend="reference"``)
    attends. (2) ``window_frac=0.8`` is accepted with the default ``heavy_frac``: the heavy hitters take at most what
    the window leaves. (3) A fixed ``t`` and the online variant keep their slots with queries (no heavy hitters on
    top, so no StreamingLLM fallback). (4) NumPy input at keep 0.8 compresses: the size check bills the sketch
    once, not its padded copy besides (it fell back at base)."""
    rng = np.random.default_rng(0)
    K, V, Q = (rng.standard_normal((2, n, 16)) for n in (128, 128, 8))
    t = balancekv.compress(torch.from_numpy(K), torch.from_numpy(V), keep=0.25, method="subgen", backend="reference")
    assert tuple(t.attend(torch.from_numpy(Q)).shape) == (2, 8, 16)
    assert balancekv.compress(K, V, keep=0.25, method="subgen", queries=Q, window_frac=0.8).kept().max() <= 32
    for opts in ({"t": 5}, {"variant": "stream", "m": 3}):
        c = balancekv.compress(K[:, :64], V[:, :64], keep=0.3, method="subgen", queries=Q, seed=0, **opts)
        assert "fallback" not in c.diagnostics and "heavy" not in {sg.label for sg in c.segments}
    c = balancekv.compress(K, V, keep=0.8, method="subgen", seed=0)
    assert "fallback" not in c.diagnostics and c.ratio < 0.9


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_capped_sketch_built_while_decoding_holds_the_caches_dtype(kind):
    """A prompt shorter than the window is held exactly; the sketch the capped policy builds later from the first
    evicted tokens holds them in the cache's float16, like a sketch built at compress (it stayed in the compute
    dtype, and bytes doubled). Control: the same stream compressed from a long prompt."""
    rng = np.random.default_rng(0)
    K, V = (rng.standard_normal((2, 600, 32)).astype(np.float16) for _ in range(2))
    conv = (lambda x: torch.from_numpy(x)) if kind == "torch" else (lambda x: x)
    short = balancekv.compress(conv(K[:, :20]), conv(V[:, :20]), cap=128, method="subgen", seed=0)
    assert short._stream.stream.state is None  # (shorter than the window: no sketch yet)
    short.append(conv(K[:, 20:]), conv(V[:, 20:]))
    long = balancekv.compress(conv(K[:, :300]), conv(V[:, :300]), cap=128, method="subgen", seed=0)
    long.append(conv(K[:, 300:]), conv(V[:, 300:]))
    assert short.nbytes <= 1.1 * long.nbytes
