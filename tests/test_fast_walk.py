"""Fast walks (torch, Triton) against the NumPy reference (SPEC sections 2, 4b, 11).

Contract checked: fed the same uniforms, in float64, the fast signs equal the
reference signs; where a row first differs, the reference's ``|r_i - p_i|`` must be
below 1e-9 (a genuine tie), otherwise the test fails.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _fast_helpers import HAS_CUDA, first_difference, needs_interpreter, triton_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st

rw = importlib.import_module("balancekv.reference.walk")
rb = importlib.import_module("balancekv.reference.blocked_balance")
fw = importlib.import_module("balancekv.fast.walk")
fb = importlib.import_module("balancekv.fast.blocked_balance")

TIE = 1e-9


def _gram_problem(seed, B=6, n=48, D=5, mult=3.0):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(B, n, D))
    U /= np.linalg.norm(U, axis=-1, keepdims=True)
    return mult * np.einsum("bid,bjd->bij", U, U), rng.random((B, n))


def _assert_gram_signs_match(G, r, c, x, f):
    xs, fs = rw.gram_walk_signs(G, r, c)
    cc = np.broadcast_to(np.asarray(c, float), (G.shape[0],))
    for row, i in first_difference(np.asarray(x), xs):
        g = float(G[row, i, :i] @ xs[row, :i].astype(float))
        p = 0.5 - g / (2 * cc[row])
        assert abs(r[row, i] - p) < TIE or abs(abs(g) - cc[row]) < TIE, (row, i, r[row, i], p)
    if not first_difference(np.asarray(x), xs):
        np.testing.assert_array_equal(np.asarray(f), fs)


def _blocked_p(K, V, r, w, ok, x_ref, row, i, scale, gamma, value_centering, temp=1.0, beta=0.0, a2=0.025):
    """The reference's p_i at (row, i), recomputed from the documented formula in float64."""
    okf = ok[row].astype(float)
    Kc = (K[row] - okf @ K[row] / max(okf.sum(), 1.0)) * okf[:, None]
    if value_centering:
        wv = w[row] * okf
        Vp = w[row][:, None] * (V[row] - wv @ V[row] / wv.sum())
    else:
        Vp = w[row][:, None] * V[row]
    Vp = Vp * okf[:, None]
    kap = np.exp(np.minimum(temp * scale * Kc[i] @ Kc[:i].T - beta, rb.EXP_CLIP)) * (Vp[i] @ Vp[:i].T + a2)
    return float(np.clip(0.5 - gamma * kap @ x_ref[row, :i].astype(float), 0, 1))


def _assert_blocked_match(x, K, V, r, w, ok, scale, gamma=4.0, value_centering=True):
    xs = rb.blocked_walk_signs(K, V, r, weights=w, valid=ok, scale=scale, gamma=gamma, value_centering=value_centering)
    x = np.asarray(x)
    assert x.dtype == np.int8 and x.shape == xs.shape
    np.testing.assert_array_equal(x == 0, ~ok)  # padding exactly 0
    for row, i in first_difference(x, xs):
        p = _blocked_p(K, V, r, w, ok, xs, row, i, scale, gamma, value_centering)
        assert abs(r[row, i] - p) < TIE, f"signs differ at block {row} step {i} without a tie (r={r[row, i]}, p={p})"


def _blocked_problem(seed, B=4, blk=24, d=8, s=6):
    rng = np.random.default_rng(seed)
    K = rng.normal(size=(B, blk, d)) * 1.5
    V = rng.normal(size=(B, blk, s))
    r = rng.random((B, blk))
    w = rng.choice([1.0, 2.0, 4.0], size=(B, blk))
    ok = np.ones((B, blk), bool)
    ok[1, blk - 7 :] = False  # padded tail
    ok[2, :3] = False  # leading invalid: the first *valid* token is forced +1
    return K, V, r, w, ok


# ------------------------------------------------------------------ theory walk (Gram form, FAIL)
@pytest.mark.parametrize("seed", [0, 1])
def test_gram_walk_torch_matches_reference_with_failures(seed):
    """Same uniforms -> same signs and FAIL steps (small thresholds force failures in some rows)."""
    G, r = _gram_problem(seed)
    c = np.array([0.5, 1.0, 2.0, 4.0, 50.0, 1e3])
    x, f = fw.gram_walk_signs(torch.from_numpy(G), torch.from_numpy(r), torch.from_numpy(c), backend="torch")
    _assert_gram_signs_match(G, r, c, x.numpy(), f.numpy())
    xs, fs = rw.gram_walk_signs(G, r, c)
    assert (fs >= 0).any() and (fs < 0).any()  # the problem exercises both outcomes
    np.testing.assert_array_equal(f.numpy(), fs)


def test_gram_walk_numpy_in_numpy_out():
    G, r = _gram_problem(3, B=2, n=10)
    x, f = fw.gram_walk_signs(G, r, 5.0)
    assert isinstance(x, np.ndarray) and x.dtype == np.int8 and f.dtype == np.int64


@needs_interpreter
def test_gram_walk_triton_interpreter_matches_reference():
    G, r = _gram_problem(4, B=3, n=20)
    c = np.array([0.7, 3.0, 1e3])
    with triton_interpreter():
        x, f = fw.gram_walk_signs(torch.from_numpy(G), torch.from_numpy(r), torch.from_numpy(c), backend="triton")
    _assert_gram_signs_match(G, r, c, x.numpy(), f.numpy())
    np.testing.assert_array_equal(f.numpy(), rw.gram_walk_signs(G, r, c)[1])


def test_gram_walk_rejects_bad_input():
    G, r = _gram_problem(0, B=2, n=5)
    with pytest.raises(ValueError, match="uniforms"):
        fw.gram_walk_signs(G, r[:, :3], 1.0)
    with pytest.raises(ValueError, match="uniforms"):
        fw.gram_walk_signs(G, r + 1.0, 1.0)
    with pytest.raises(ValueError, match="c must be"):
        fw.gram_walk_signs(G, r, 0.0)
    with pytest.raises(ValueError, match="G must"):
        fw.gram_walk_signs(G[0], r, 1.0)


# ------------------------------------------------------------------ blocked walk (SPEC 4b)
@pytest.mark.parametrize("value_centering", [True, False])
@pytest.mark.parametrize("gamma", [4.0, 0.0])
def test_blocked_walk_torch_matches_reference(value_centering, gamma):
    K, V, r, w, ok = _blocked_problem(7)
    x = fb.blocked_walk_signs(
        K, V, r, weights=w, valid=ok, scale=0.35, gamma=gamma, value_centering=value_centering, backend="torch"
    )
    _assert_blocked_match(x, K, V, r, w, ok, 0.35, gamma, value_centering)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    blk=st.integers(1, 40),
    d=st.integers(1, 9),
    key_scale=st.sampled_from([0.1, 1.0, 5.0, 1e4]),
)
def test_blocked_walk_torch_property(seed, blk, d, key_scale):
    """Any shape, including keys of norm ~1e4 (exponent clip): signs equal the reference up to ties."""
    rng = np.random.default_rng(seed)
    B = 3
    K = rng.normal(size=(B, blk, d)) * key_scale
    V = rng.normal(size=(B, blk, 3))
    r = rng.random((B, blk))
    w = rng.choice([1.0, 2.0], size=(B, blk))
    ok = rng.random((B, blk)) < 0.8
    x = fb.blocked_walk_signs(K, V, r, weights=w, valid=ok, scale=1 / np.sqrt(d), backend="torch")
    _assert_blocked_match(x, K, V, r, w, ok, 1 / np.sqrt(d))


@needs_interpreter
def test_blocked_walk_triton_interpreter_matches_reference():
    K, V, r, w, ok = _blocked_problem(11, B=3, blk=20)
    with triton_interpreter():
        x = fb.blocked_walk_signs(
            torch.from_numpy(K),
            torch.from_numpy(V),
            torch.from_numpy(r),
            weights=torch.from_numpy(w),
            valid=torch.from_numpy(ok),
            scale=0.35,
            backend="triton",
        )
    _assert_blocked_match(x.numpy(), K, V, r, w, ok, 0.35)


def test_fixed_size_halving_matches_reference():
    rng = np.random.default_rng(5)
    x = rng.choice([-1, 1], size=(50, 16)).astype(np.int8)
    ok = rng.random((50, 16)) < 0.85
    ok[0] = False
    ok[1, :] = False
    ok[1, 4] = True  # a single valid token
    x = np.where(ok, x, 0).astype(np.int8)
    keep, dbl = fb.fixed_size_halving(torch.from_numpy(x), torch.from_numpy(ok))
    rk, rd = rb.fixed_size_halving(x, ok)
    np.testing.assert_array_equal(keep.numpy(), rk)
    np.testing.assert_array_equal(dbl.numpy(), rd)


def test_blocked_balance_torch_same_tokens_as_reference():
    """The whole SPEC 4b procedure: same generator state -> same kept indices and log-weights."""
    rng = np.random.default_rng(9)
    K = rng.normal(size=(3, 700, 16))
    V = rng.normal(size=(3, 700, 16))
    kw = dict(itrs=2, block=64, sink=8, window=8, scale=0.25)
    ri, rl = rb.blocked_balance(K, V, rng=np.random.default_rng(1), **kw)
    fi, fl = fb.blocked_balance(K, V, rng=np.random.default_rng(1), backend="torch", **kw)
    np.testing.assert_array_equal(fi, ri)
    np.testing.assert_array_equal(fl, rl)


def test_blocked_walk_float32_error_within_1p1x_of_reference():
    """SPEC 11: in float32 the fast path's attention error is statistically that of the reference.

    Mean relative error of the SPEC 4b estimator over 16 heads x 32 queries, float32 fast path
    vs float64 reference, same uniforms: ratio <= 1.1 (deterministic given the fixed seed).
    """
    from balancekv.reference.softmax_attention import attention, relative_error, weighted_attention

    from balancekv.synthetic import make_kv

    K, V, Q = make_kv("bounded", heads=16, n=512, d=16, q=32, seed=2)
    kw = dict(itrs=2, block=64, sink=8, window=8, scale=0.25)
    exact = attention(Q, K, V, 0.25)
    errs = []
    for impl in (
        lambda: rb.blocked_balance(K, V, rng=np.random.default_rng(3), **kw),
        lambda: fb.blocked_balance(
            torch.from_numpy(K).float(),
            torch.from_numpy(V).float(),
            rng=np.random.default_rng(3),
            backend="torch",
            **kw,
        ),
    ):
        idx, lw = (np.asarray(a.tolist()) if torch.is_tensor(a) else a for a in impl())  # torch in, torch out
        Kk = np.take_along_axis(K, idx[..., None], 1)
        Vk = np.take_along_axis(V, idx[..., None], 1)
        errs.append(relative_error(weighted_attention(Q, Kk, Vk, lw, lw, 0.25), exact).mean())
    assert errs[1] <= 1.1 * errs[0], errs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_blocked_walk_triton_gpu_matches_reference():
    """Compiled kernel, real tile size (block=128, d=128), float64: signs equal up to ties."""
    rng = np.random.default_rng(0)
    B, blk, d = 64, 128, 128
    K = rng.normal(size=(B, blk, d))
    V = rng.normal(size=(B, blk, d))
    r = rng.random((B, blk))
    w = np.ones((B, blk))
    ok = np.ones((B, blk), bool)
    dev = lambda a: torch.from_numpy(a).cuda()
    x = fb.blocked_walk_signs(dev(K), dev(V), dev(r), weights=dev(w), valid=dev(ok), scale=d**-0.5, backend="triton")
    _assert_blocked_match(x.cpu().numpy(), K, V, r, w, ok, d**-0.5)
