"""Torch SubGen (:mod:`balancekv.fast.subgen`) against the NumPy reference (SPEC sections 5, 10, 11).

Contract checked: fed the same uniforms, in float64 on CPU, the fast path builds the same
state as :mod:`balancekv.reference.subgen` -- the same centres, assignments, distances and
radii (bit-identical: distances reproduce NumPy's summation order), the same reservoir and
numerator slots, the same members; the numerator weights ``log(mu / (s_num ||v||^2))`` agree
to 1e-12 (``||v||^2`` may be summed in a different order than the reference's BLAS dot, so
``mu`` can differ in the last bit). A slot could then differ only if a uniform fell within
~1e-15 of ``||v||^2 / mu``; with the fixed seeds below no such tie occurs (a random seed
would hit one with probability below 1e-9 over the whole file), so the tests are deterministic.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from balancekv.reference.softmax_attention import attention
from hypothesis import given, settings
from hypothesis import strategies as st

import balancekv
from balancekv.synthetic import make_kv

rs = importlib.import_module("balancekv.reference.subgen")
fs = importlib.import_module("balancekv.fast.subgen")

WTOL = 1e-12


def assert_same_state(ref, fast):
    """Every field of two ``SubGenState`` equal (exactly, except ``mu`` and log-weights to 1e-12)."""
    assert len(ref.heads) == len(fast.heads)
    for h, (a, b) in enumerate(zip(ref.heads, fast.heads)):
        assert (a.t, a.s_num, a.n_seen, a.m) == (b.t, b.s_num, b.n_seen, b.m), h
        assert a.threshold == b.threshold and a.scale == b.scale
        np.testing.assert_array_equal(a._C, b._C)
        for c, (ca, cb) in enumerate(zip(a.clusters, b.clusters)):
            np.testing.assert_array_equal(ca.centre, cb.centre)
            assert ca.count == cb.count and ca.radius == cb.radius, (h, c)
            np.testing.assert_array_equal(ca.slot_pos, cb.slot_pos)
            np.testing.assert_array_equal(ca.slot_k, cb.slot_k)
            np.testing.assert_array_equal(ca.slot_v, cb.slot_v)
            assert (ca.members is None) == (cb.members is None), (h, c)
            if ca.members is not None:
                assert [p for p, _, _ in ca.members] == [p for p, _, _ in cb.members]
                for (_, ka, va), (_, kb, vb) in zip(ca.members, cb.members):
                    np.testing.assert_array_equal(ka, kb)
                    np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(a.num_pos, b.num_pos)
        np.testing.assert_array_equal(a.num_k, b.num_k)
        np.testing.assert_array_equal(a.num_v, b.num_v)
        np.testing.assert_allclose(b.num_sq, a.num_sq, rtol=WTOL, atol=0)
        assert abs(a.mu - b.mu) <= WTOL * a.mu
    pa, pb = ref.padded(), fast.padded()
    for x, y in zip(pa[:3], pb[:3]):  # positions, keys, values
        np.testing.assert_array_equal(x, y)
    for x, y in zip(pa[3:], pb[3:]):  # log-weights (-inf padding must match too)
        np.testing.assert_array_equal(np.isfinite(x), np.isfinite(y))
        np.testing.assert_allclose(y[np.isfinite(y)], x[np.isfinite(x)], rtol=0, atol=WTOL)


# ---------------------------------------------------------------------- data
def _data(kind, seed, H=3, n=200, d=8, s=5):
    """Keys/values of one family, folded scale 0.6; returns ``(K, V, scale, thresholds (H,))``."""
    rng = np.random.default_rng([seed, n, d])
    scale = 0.6
    if kind == "clustered":
        K, V, _ = make_kv("clustered", heads=H, n=n, d=d, s=s, seed=seed, clusters=5, radius=0.5)
        thr = np.full(H, 1.0)
    elif kind == "gaussian":
        K, V = rng.normal(size=(H, n, d)), rng.normal(size=(H, n, s))
        thr = np.array([1.5, 2.5, 3.5][:H])
    elif kind == "single":  # one cluster: every key within the threshold of the first
        K = rng.normal(size=(1, 1, d)) + 0.05 * rng.normal(size=(H, n, d))
        V = rng.normal(size=(H, n, s))
        thr = np.full(H, 10.0)
    elif kind == "lattice":  # integer keys: many exact distance ties (lowest centre must win)
        K = rng.integers(-2, 3, size=(H, n, d)).astype(float)
        V = rng.integers(-1, 2, size=(H, n, s)).astype(float)  # many zero-norm values too
        scale, thr = 1.0, np.full(H, 2.0)
    elif kind == "ties":  # keys on the bisector of two centres: distances tie up to rounding
        o = rng.normal(size=(H, 1, d)) * 3.3
        u = rng.normal(size=(H, 1, d))
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        w = rng.normal(size=(H, n, d))
        w -= (w * u).sum(-1, keepdims=True) * u
        w *= 0.5 * rng.random((H, n, 1)) / np.linalg.norm(w, axis=-1, keepdims=True)
        K = o + w
        K[:, 0], K[:, 1] = o[:, 0] + u[:, 0], o[:, 0] - u[:, 0]  # the two centres, 2 apart
        V = rng.normal(size=(H, n, s))
        scale, thr = 1.0, np.full(H, 1.5)
    else:
        raise ValueError(kind)
    if kind != "lattice":
        V[:, ::6] = 0.0  # zero-norm values are never numerator samples
    return K, V, scale, thr


KINDS = ["clustered", "gaussian", "single", "lattice", "ties"]


@pytest.fixture(params=[24, 256], ids=["block24", "block256"])
def block(request, monkeypatch):
    """The clustering scan's block size: small blocks exercise the batched nearest-centre search
    (matmul filter, exact recomputation of near ties) on these small inputs, large ones the
    event updates inside one block."""
    monkeypatch.setattr(fs, "BLOCK", request.param)
    return request.param


def _uniforms(kind, rng, shape):
    """Uniforms; for the lattice, multiples of 1/4 so that ``u == p`` happens (``u < p`` is strict)."""
    return rng.integers(0, 4, size=shape) / 4.0 if kind == "lattice" else rng.random(shape)


# ---------------------------------------------------------------------- clustering
@pytest.mark.parametrize("kind", KINDS)
def test_clusterings_identical_to_reference(kind, block):
    """online_clusters and greedy_k_center: same centres, assignments and distances, bit for bit,
    per head (2-D input) and for all heads at once (3-D input, centres padded with -1)."""
    K, _, scale, thr = _data(kind, 1)
    X = scale * K
    on_b = fs.online_clusters(X, thr)
    gk_b = fs.greedy_k_center(X, 6)
    for h in range(X.shape[0]):
        for ref, fast, batched in (
            (rs.online_clusters(X[h], thr[h]), fs.online_clusters(X[h], thr[h]), on_b),
            (rs.greedy_k_center(X[h], 6), fs.greedy_k_center(X[h], 6), gk_b),
        ):
            for r, f in zip(ref, fast):
                assert r.dtype == f.dtype
                np.testing.assert_array_equal(r, f)
            k = ref[0].size
            np.testing.assert_array_equal(batched[0][h, :k], ref[0])
            assert np.all(batched[0][h, k:] == -1)
            np.testing.assert_array_equal(batched[1][h], ref[1])
            np.testing.assert_array_equal(batched[2][h], ref[2])


def test_clustering_torch_in_torch_out_and_threshold_edge_cases():
    """Torch input gives torch output with the same values; threshold 0 makes every distinct key a
    centre and an infinite threshold one centre (the first key), as the reference."""
    K, _, scale, _ = _data("gaussian", 2, n=60)
    X = scale * K[0]
    c, a, dist = fs.online_clusters(torch.from_numpy(X), 1.7)
    assert isinstance(c, torch.Tensor) and isinstance(dist, torch.Tensor)
    for r, f in zip(rs.online_clusters(X, 1.7), (c, a, dist)):
        np.testing.assert_array_equal(r, f.numpy())
    for thr in (0.0, np.inf):
        for r, f in zip(rs.online_clusters(X, thr), fs.online_clusters(X, thr)):
            np.testing.assert_array_equal(r, f)
    assert fs.online_clusters(X, np.inf)[0].tolist() == [0]
    assert fs.online_clusters(X, 0.0)[0].size == 60


# ---------------------------------------------------------------------- SubGen state
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [4, [6, 2, 3]])
def test_stream_state_identical_to_reference(kind, t, block):
    """subgen_stream: same state as the reference for the same uniforms (per-head t included)."""
    K, V, scale, thr = _data(kind, 3)
    t_max = max(np.atleast_1d(t))
    U = _uniforms(kind, np.random.default_rng(11), (K.shape[1], K.shape[0], t_max + 7))
    ref = rs.subgen_stream(K, V, t=t, s_num=7, threshold=thr, scale=scale, uniforms=U)
    fast = fs.subgen_stream(K, V, t=t, s_num=7, threshold=thr, scale=scale, uniforms=U)
    assert_same_state(ref, fast)
    if kind == "single":
        assert all(h.m == 1 for h in fast.heads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [4, [6, 2, 3]])
def test_offline_state_identical_to_reference(kind, t):
    """subgen_offline: same k-centre clusters, reservoir picks and l2 samples (same rng draws)."""
    K, V, scale, _ = _data(kind, 4)
    ref = rs.subgen_offline(K, V, t=t, s_num=9, m=5, scale=scale, rng=np.random.default_rng(5))
    fast = fs.subgen_offline(K, V, t=t, s_num=9, m=5, scale=scale, rng=np.random.default_rng(5))
    assert_same_state(ref, fast)


@pytest.mark.parametrize("variant", ["stream", "offline"])
def test_single_token_and_all_zero_values(variant):
    """n = 1 (one cluster holding the token) and a head whose values are all zero (mu = 0, no
    numerator slot is ever filled): same state as the reference."""
    rng = np.random.default_rng(6)
    for n in (1, 5):
        K, V = rng.normal(size=(2, n, 4)), rng.normal(size=(2, n, 3))
        V[1] = 0.0
        kw = dict(t=3, s_num=4, scale=0.5)
        if variant == "stream":
            U = rng.random((n, 2, 7))
            ref = rs.subgen_stream(K, V, threshold=1.0, uniforms=U, **kw)
            fast = fs.subgen_stream(K, V, threshold=1.0, uniforms=U, **kw)
        else:
            ref = rs.subgen_offline(K, V, m=3, rng=np.random.default_rng(n), **kw)
            fast = fs.subgen_offline(K, V, m=3, rng=np.random.default_rng(n), **kw)
        assert_same_state(ref, fast)
        assert fast.heads[1].mu == 0.0 and np.all(fast.heads[1].num_pos == -1)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 90),
    d=st.integers(1, 11),
    thr=st.floats(0.0, 4.0),
    t=st.integers(1, 6),
    s_num=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_stream_identical_hypothesis(n, d, thr, t, s_num, seed):
    """Random sizes (d across NumPy's summation regimes below 8 and above), thresholds and slot
    counts: the fast stream state equals the reference's, and continuing the returned state
    with the reference update equals streaming everything through the reference."""
    rng = np.random.default_rng(seed)
    K, V = rng.normal(size=(2, n, d)), rng.normal(size=(2, n, 3))
    V[:, rng.random(n) < 0.2] = 0.0
    U = rng.random((n + 3, 2, t + s_num))
    Kx, Vx = rng.normal(size=(2, 3, d)), rng.normal(size=(2, 3, 3))
    kw = dict(t=t, s_num=s_num, threshold=thr, scale=0.8)
    ref = rs.subgen_stream(np.concatenate([K, Kx], 1), np.concatenate([V, Vx], 1), uniforms=U, **kw)
    fast = fs.subgen_stream(K, V, uniforms=U[:n], **kw).append(Kx, Vx, np.arange(n, n + 3), uniforms=U[n:])
    assert_same_state(ref, fast)


def test_larger_dimension_block_boundaries():
    """d = 136 (NumPy's pairwise summation splits above 128) and n spanning several scan blocks."""
    rng = np.random.default_rng(8)
    H, n, d = 2, 700, 136
    K = np.repeat(rng.normal(size=(H, 12, d)), 60, axis=1)[:, :n] + 0.3 * rng.normal(size=(H, n, d))
    V = rng.normal(size=(H, n, 4))
    U = rng.random((n, H, 5 + 6))
    kw = dict(t=5, s_num=6, threshold=np.array([7.0, 9.0]), scale=0.5)
    assert_same_state(rs.subgen_stream(K, V, uniforms=U, **kw), fs.subgen_stream(K, V, uniforms=U, **kw))


# ---------------------------------------------------------------------- method
@pytest.mark.parametrize("variant,opts", [("offline", {}), ("stream", {}), ("stream", {"threshold": 0.8, "m": 4})])
def test_compress_torch_backend_equals_reference(variant, opts):
    """compress(method="subgen", backend="torch") keeps the same positions as backend="reference"
    with the same log-weights (to 1e-12) and the same diagnostics, also after decode-time appends."""
    K, V, Q = make_kv("clustered", heads=2, n=192, d=16, seed=9, clusters=6, radius=0.4)
    out = {}
    for backend in ("reference", "torch"):
        out[backend] = balancekv.compress(
            K, V, keep=0.25, method="subgen", seed=3, backend=backend, variant=variant, **opts
        )
    a, b = out["reference"], out["torch"]
    assert_same_tokens(a, b)
    ia, ib = a.diagnostics["level_info"], b.diagnostics["level_info"]
    assert len(ia) == len(ib) == 1
    for key in ("t", "clusters", "cluster_radius", "threshold"):  # "kept": torch counts slots, not tokens
        assert ia[0].get(key) == ib[0].get(key), key
    np.testing.assert_allclose(b.attend(Q), a.attend(Q), rtol=1e-12, atol=1e-12)
    # both consumed the same draws, so decoding continues identically (torch: the device-native update)
    Kx, Vx, _ = make_kv("clustered", heads=2, n=8, d=16, seed=10, clusters=6, radius=0.4)
    a.append(Kx, Vx)
    b.append(Kx, Vx)
    assert_same_tokens(a, b)
    np.testing.assert_allclose(b.attend(Q), a.attend(Q), rtol=1e-12, atol=1e-12)


def merged_tokens(c):
    """Per head ``{position: (key, log num weight, log den weight)}``, slots of one token merged (weights
    summed): the torch cache shares the state's slots (a token may sit in several), the reference
    stores each token once; both define the same estimate."""
    out = []
    for h in range(c.positions.shape[0]):
        d = {}
        for p, k, a, b in zip(c.positions[h], c.keys[h], c.num_logw[h], c.den_logw[h]):
            if p < 0 or not (np.isfinite(a) or np.isfinite(b)):
                continue
            x = d.setdefault(int(p), [k, -np.inf, -np.inf])
            np.testing.assert_array_equal(x[0], k)
            x[1], x[2] = np.logaddexp(x[1], a), np.logaddexp(x[2], b)
        out.append(d)
    return out


def assert_same_tokens(a, b):
    for x, y in zip(merged_tokens(a), merged_tokens(b)):
        assert sorted(x) == sorted(y)
        for p in x:
            np.testing.assert_array_equal(x[p][0], y[p][0])
            np.testing.assert_allclose(y[p][1:], x[p][1:], rtol=0, atol=WTOL)


# ---------------------------------------------------------------------- float32
def test_float32_error_within_1p1x_of_reference():
    """Float32 keys/values (geometry in float32, sampling decisions in float64): the mean relative
    attention error of the stream estimate over 6 seeded caches is within 1.1x of the float64
    reference's with the same uniforms (deterministic given the seeds; SPEC 11)."""
    err_ref, err_fast = [], []
    for seed in range(6):
        K, V, Q = make_kv("clustered", heads=2, n=256, d=16, seed=seed, clusters=6, radius=0.3)
        scale = 16**-0.5
        thr = np.asarray([rs.greedy_k_center(rs.fold_scale(K[h], scale), 6)[2].max() for h in range(2)])
        U = np.random.default_rng(seed).random((256, 2, 8 + 32))
        kw = dict(t=8, s_num=32, threshold=thr, scale=scale, uniforms=U)
        exact = attention(Q, K, V, scale)
        for state, errs in (
            (rs.subgen_stream(K, V, **kw), err_ref),
            (fs.subgen_stream(torch.from_numpy(K).float(), torch.from_numpy(V).float(), **kw), err_fast),
        ):
            N, Z = state.estimate(Q, shift=0.0)
            z = N / Z[..., None]
            errs.append(np.mean(np.linalg.norm(z - exact, axis=-1) / np.linalg.norm(exact, axis=-1)))
    assert np.mean(err_fast) <= 1.1 * np.mean(err_ref)


# ---------------------------------------------------------------------- bad input
def test_bad_input_and_inputs_untouched():
    K, V, scale, thr = _data("gaussian", 10, n=20)
    K0, V0 = K.copy(), V.copy()
    U = np.random.default_rng(0).random((20, 3, 4 + 2))
    fs.subgen_stream(K, V, t=4, s_num=2, threshold=thr, scale=scale, uniforms=U)
    fs.subgen_offline(K, V, t=4, s_num=2, m=3, scale=scale, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(K, K0)
    np.testing.assert_array_equal(V, V0)
    with pytest.raises(ValueError, match="uniforms"):
        fs.subgen_stream(K, V, t=4, s_num=2, threshold=thr, scale=scale, uniforms=U[:, :, :5])
    with pytest.raises(ValueError, match="rng"):
        fs.subgen_stream(K, V, t=4, s_num=2, threshold=thr, scale=scale)
    with pytest.raises(ValueError, match="threshold"):
        fs.subgen_stream(K, V, t=4, s_num=2, threshold=-1.0, scale=scale, uniforms=U)
    with pytest.raises(ValueError, match="t "):
        fs.subgen_stream(K, V, t=0, s_num=2, threshold=thr, scale=scale, uniforms=U)
    with pytest.raises(ValueError, match="m "):
        fs.subgen_offline(K, V, t=4, s_num=2, m=0, scale=scale, rng=np.random.default_rng(0))
    Kbad = K.copy()
    Kbad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="K"):
        fs.subgen_stream(Kbad, V, t=4, s_num=2, threshold=thr, scale=scale, uniforms=U)
    with pytest.raises(ValueError, match="X"):
        fs.online_clusters(K[0, :, :, None, None], 1.0)
    with pytest.raises(TypeError, match="X"):
        fs.greedy_k_center("keys", 3)
