"""Token selection [H2O, SNAP, SLLM] and pyramid layer budgets [PYR, MINI] (SPEC section 7)."""

from __future__ import annotations

import numpy as np
import pytest
from balancekv.reference.selection import h2o_scores, pyramid_budgets, select_top, snapkv_scores, streaming_indices
from hypothesis import given, settings
from hypothesis import strategies as st

import balancekv as bk
from balancekv.synthetic import make_kv


def _softmax(a):
    e = np.exp(a - a.max())
    return e / e.sum()


def _brute_h2o(Q, K, scale, group):
    """Loop definition: for each query head, each query j at position L-Lq+j, add its causal softmax row."""
    Hq, Lq, d = Q.shape
    L = K.shape[1]
    out = np.zeros((K.shape[0], L))
    for hq in range(Hq):
        h = hq // group
        for j in range(Lq):
            p = L - Lq + j
            out[h, : p + 1] += _softmax(scale * K[h, : p + 1] @ Q[hq, j])
    return out


@pytest.mark.parametrize("group,Lq", [(1, 20), (3, 20), (2, 7)])
def test_h2o_scores_match_the_definition(group, Lq):
    rng = np.random.default_rng(group * 100 + Lq)
    K = rng.normal(size=(2, 20, 8))
    Q = rng.normal(size=(2 * group, Lq, 8))
    sc = h2o_scores(Q, K, scale=0.3, group=group)
    np.testing.assert_allclose(sc, _brute_h2o(Q, K, 0.3, group), rtol=1e-12, atol=1e-14)
    # every causal row sums to one: each KV head's scores sum to group * Lq
    np.testing.assert_allclose(sc.sum(-1), group * Lq, rtol=1e-12)


def test_h2o_scores_batch_dims_and_stability():
    rng = np.random.default_rng(1)
    K = rng.normal(size=(2, 3, 16, 4)) * 1e4  # huge logits must not overflow
    Q = rng.normal(size=(2, 3, 16, 4))
    sc = h2o_scores(Q, K)
    assert sc.shape == (2, 3, 16) and np.all(np.isfinite(sc))


def _brute_snap(Q, K, scale, w, kernel, pool):
    L = K.shape[1]
    out = np.full((K.shape[0], L), np.inf)
    for h in range(K.shape[0]):
        col = np.zeros(L)
        for j in range(w):
            p = L - w + j
            col[: p + 1] += _softmax(scale * K[h, : p + 1] @ Q[h, Q.shape[1] - w + j])
        pre = col[: L - w]
        for i in range(L - w):
            win = [pre[t] for t in range(i - kernel // 2, i + kernel // 2 + 1) if 0 <= t < L - w]
            out[h, i] = max(win) if pool == "max" else sum(win) / kernel
    return out


@pytest.mark.parametrize("pool,kernel,w", [("max", 7, 5), ("avg", 5, 8), ("max", 1, 3)])
def test_snapkv_scores_match_the_definition(pool, kernel, w):
    rng = np.random.default_rng(kernel + w)
    K = rng.normal(size=(2, 30, 8))
    Q = rng.normal(size=(2, 12, 8))
    sc = snapkv_scores(Q, K, scale=0.5, window=w, kernel=kernel, pool=pool)
    np.testing.assert_allclose(sc, _brute_snap(Q, K, 0.5, w, kernel, pool), rtol=1e-12, atol=1e-15)
    assert np.all(np.isinf(sc[:, -w:]))


@settings(max_examples=50, deadline=None)
@given(L=st.integers(1, 60), data=st.data(), seed=st.integers(0, 2**31), ties=st.booleans())
def test_select_top_keeps_recent_and_the_top_scores(L, data, seed, ties):
    """select_top: exactly `budget` sorted distinct indices, the last `recent` positions, and every kept
    earlier position scores >= every dropped one (ties broken towards the earlier position)."""
    budget = data.draw(st.integers(0, L))
    recent = data.draw(st.integers(0, budget))
    rng = np.random.default_rng(seed)
    sc = rng.integers(0, 4, size=(3, L)).astype(float) if ties else rng.normal(size=(3, L))
    idx = select_top(sc, budget, recent)
    assert idx.shape == (3, budget)
    for h in range(3):
        kept = set(idx[h].tolist())
        assert len(kept) == budget and list(idx[h]) == sorted(kept)
        assert set(range(L - recent, L)) <= kept
        cand = [i for i in range(L - recent)]
        kc = [i for i in cand if i in kept]
        dc = [i for i in cand if i not in kept]
        if kc and dc:
            assert min(sc[h, kc]) >= max(sc[h, dc])
            # ties: a dropped position with the same score as a kept one comes later
            for i in dc:
                assert all(not (sc[h, i] == sc[h, k] and i < k) for k in kc)


def test_select_top_bad_input():
    with pytest.raises(ValueError, match="budget"):
        select_top(np.zeros(5), 6, 0)
    with pytest.raises(ValueError, match="recent"):
        select_top(np.zeros(5), 2, 3)
    with pytest.raises(ValueError, match="NaN"):
        select_top(np.full(5, np.nan), 2, 1)


@settings(max_examples=50, deadline=None)
@given(layers=st.integers(1, 80), beta=st.floats(1.0, 30.0), frac=st.floats(0.0, 1.0))
def test_pyramid_budgets_average_to_the_ratio(layers, beta, frac):
    """Unclipped (h <= 1/(2 - 1/beta)): mean == h, h_{L-1} = h/beta, h_0 = 2h - h/beta, non-increasing.
    Always: ratios in [0, 1] and mean <= h."""
    hmax = 1.0 / (2.0 - 1.0 / beta)
    h = frac * hmax
    r = pyramid_budgets(h, layers, beta)
    assert r.shape == (layers,)
    np.testing.assert_allclose(r.mean(), h, rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(r) <= 1e-15)
    if layers > 1:
        np.testing.assert_allclose([r[0], r[-1]], [2 * h - h / beta, h / beta], rtol=1e-12, atol=1e-15)
    big = pyramid_budgets(min(1.0, hmax * 1.5), layers, beta)
    assert np.all((big >= 0) & (big <= 1)) and big.mean() <= min(1.0, hmax * 1.5) + 1e-12


def test_pyramid_budgets_minikv_example():
    """MiniKV beta = 7, h = 0.5 over 32 layers: 13/14 at layer 0 and 1/14 at layer 31."""
    r = pyramid_budgets(0.5, 32, 7)
    np.testing.assert_allclose([r[0], r[-1]], [13 / 14, 1 / 14])


def test_streaming_indices():
    np.testing.assert_array_equal(streaming_indices(10, 2, 3), [0, 1, 7, 8, 9])
    np.testing.assert_array_equal(streaming_indices(4, 3, 3), [0, 1, 2, 3])


def with_sinks(scores, m, recent, s):
    """The expected selection with the first ``s`` tokens kept: those, plus ``select_top`` of the rest."""
    rest = select_top(scores[..., s:], m - s, recent) + s
    return np.concatenate([np.broadcast_to(np.arange(s), rest.shape[:-1] + (s,)), rest], -1)


def sink_problem(seed=0, H=2, n=256, d=16):
    """Keys that attend to themselves (orthogonal to the first axis, norm ~12), and queries that read token 0,
    the only key along that axis, whose value is large: what an attention sink looks like to a stand-in scorer."""
    rng = np.random.default_rng(seed)
    K = 3.0 * rng.standard_normal((H, n, d))
    K[:, :, 0] = 0.0
    K[:, 0] = 0.0
    K[:, 0, 0] = 8.0
    V = rng.standard_normal((H, n, d))
    V[:, 0] = 0.0
    V[:, 0, 1] = 10.0
    Q = 0.3 * rng.standard_normal((H, 64, d))
    Q[:, :, 0] = 8.0
    return K, V, Q


@pytest.mark.parametrize("method", ["h2o", "snapkv", "minikv"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_without_queries_the_selections_keep_the_attention_sink(method, kind):
    """Without queries, H2O, SnapKV and MiniKV rank tokens with stand-in queries (the keys), which attend to
    themselves and not to the first tokens that real queries read [STREAMINGLLM, arXiv 2309.17453]. With the
    default ``sink="auto"`` the first four tokens are kept, so queries reading token 0 are served (error < 0.01);
    the control ``sink=0`` drops token 0 on every head and the estimate is no better than returning zero
    (error > 0.9). Given queries, ``auto`` keeps no sink: the published selections."""
    K, V, Q = sink_problem()
    ex = bk.attention(Q, K, V)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        K, V, Qa = (torch.from_numpy(x) for x in (K, V, Q))
    else:
        Qa = Q
    errs = {}
    for sink in ("auto", 0):
        c = bk.compress(K, V, keep=0.25, method=method, sink=sink, seed=0)
        z = np.asarray(c.attend(Qa))
        errs[sink] = float((np.linalg.norm(z - ex, axis=-1) / np.linalg.norm(ex, axis=-1)).mean())
        held0 = (np.asarray(c.positions) == 0) & np.isfinite(np.asarray(c.num_logw))
        assert held0.any(-1).all() == (sink == "auto"), (sink, held0.any(-1))
        assert c.kept().max() <= 64
    assert errs["auto"] < 0.01 and errs[0] > 0.9, errs
    # with queries, auto adds no sink: the same tokens as sink=0
    a = bk.compress(K, V, keep=0.25, method=method, queries=Qa, seed=0)
    b = bk.compress(K, V, keep=0.25, method=method, queries=Qa, sink=0, seed=0)
    np.testing.assert_array_equal(np.asarray(a.positions), np.asarray(b.positions))
    with pytest.raises(TypeError, match="sink"):
        bk.compress(K, V, keep=0.25, method=method, sink=1.5)
    with pytest.raises(ValueError, match="sink"):
        bk.compress(K, V, keep=0.25, method=method, sink=-1)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_h2o_method_keeps_exactly_the_top_positions(keep):
    K, V, Q = make_kv("llm", heads=3, n=128, d=16, q=8, seed=2)
    c = bk.compress(K, V, keep=keep, method="h2o", seed=0)
    m = int(round(keep * 128))
    # no queries given: keys stand in for queries, and the first four tokens are kept (sink="auto")
    expect = with_sinks(h2o_scores(K, K), m, m // 2, 4)
    np.testing.assert_array_equal(np.sort(c.positions, -1), expect)
    c0 = bk.compress(K, V, keep=keep, method="h2o", seed=0, sink=0)
    np.testing.assert_array_equal(np.sort(c0.positions, -1), select_top(h2o_scores(K, K), m, m // 2))
    # with queries given, they are the scorers
    c2 = bk.compress(K, V, keep=keep, method="h2o", queries=Q, seed=0)
    np.testing.assert_array_equal(np.sort(c2.positions, -1), select_top(h2o_scores(Q, K), m, m // 2))
    np.testing.assert_array_equal(c2.keys, np.take_along_axis(K, np.sort(c2.positions, -1)[..., None], 1))


def test_snapkv_method_keeps_window_and_top_pooled():
    K, V, Q = make_kv("llm", heads=2, n=200, d=16, q=40, seed=3)
    c = bk.compress(K, V, keep=0.25, method="snapkv", queries=Q, window=16, seed=0)
    m = 50
    expect = select_top(snapkv_scores(Q, K, window=16), m, 16)
    np.testing.assert_array_equal(np.sort(c.positions, -1), expect)
    assert set(range(184, 200)) <= set(c.positions[0].tolist())
    # default probes: the last 64 keys
    c2 = bk.compress(K, V, keep=0.25, method="snapkv", seed=0)
    np.testing.assert_array_equal(np.sort(c2.positions, -1), with_sinks(snapkv_scores(K[:, -64:], K), m, 32, 4))
    with pytest.raises(ValueError, match="kernel"):
        bk.compress(K, V, keep=0.25, method="snapkv", kernel=4)
    with pytest.raises(ValueError, match="pool"):
        bk.compress(K, V, keep=0.25, method="snapkv", pool="median")
