"""compress(): the eps search of SPEC section 8, keep mode, determinism, diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from balancekv.reference.softmax_attention import attention, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

import balancekv
from balancekv import budget
from balancekv.api import no_query_probes


def probe_error(ckv, K, V, probes):
    return relative_error(ckv.attend(probes), attention(probes, K, V)).mean(axis=-1)


@pytest.mark.parametrize("method", ["uniform", "streaming"])
@pytest.mark.parametrize("family", ["gaussian", "bounded", "clustered"])
def test_eps_search_meets_eps_on_its_probes(kv_factory, method, family):
    K, V, Q = kv_factory(family, heads=3, n=256, d=16, q=8, seed=1)
    eps = 0.1
    c = balancekv.compress(K, V, eps, method=method, seed=0)
    # without queries the probes are fitted to the keys, drawn from the seed (not the last keys)
    probes = no_query_probes(K, 0)
    assert c.diagnostics["probe_kind"] == "fitted" and c.diagnostics["probes"] == 64
    err = probe_error(c, K, V, probes)
    # a level qualifies when margin x probe error <= eps (the fitted probes' calibrated margin, < 1)
    margin = c.diagnostics["margin"]
    assert margin == budget.MARGIN_FITTED
    assert np.all(margin * err <= eps + 1e-12), err
    np.testing.assert_allclose(err, c.diagnostics["error_per_head"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(margin * err, c.diagnostics["error_bound_per_head"], rtol=1e-9, atol=1e-12)
    # with explicit queries the probes are those queries (margin > 1: stricter than eps on them)
    cq = balancekv.compress(K, V, eps, method=method, queries=Q, seed=0)
    assert np.all(cq.diagnostics["margin"] * probe_error(cq, K, V, Q) <= eps + 1e-12)


@settings(max_examples=12, deadline=None)
@given(st.floats(0.01, 0.5), st.floats(0.01, 0.5), st.integers(0, 1000))
def test_eps_search_is_monotone(e1, e2, seed):
    """Smaller eps never keeps fewer tokens (per head), with the same seed."""
    lo, hi = sorted((e1, e2))
    K, V, _ = balancekv.synthetic.make_kv("gaussian", heads=3, n=128, d=8, seed=seed)
    a = balancekv.compress(K, V, lo, method="uniform", seed=seed)
    b = balancekv.compress(K, V, hi, method="uniform", seed=seed)
    assert np.all(a.kept() >= b.kept())
    assert a.nbytes >= b.nbytes


def test_done_criterion_uniform_eps_on_numpy_and_torch(kv_factory):
    """Issue 2: compress(K, V, 0.1, method="uniform") reports error <= 0.1 on its probes."""
    K, V, _ = kv_factory("bounded", heads=4, n=1024, d=32, seed=0)
    V = V + 1.0  # values with a common component, as in real caches (zero-mean values make every
    # attention output nearly 0 and every relative error of order 1)
    for K_, V_ in ((K, V), (torch.tensor(K, dtype=torch.float32), torch.tensor(V, dtype=torch.float32))):
        # margin=1: eps on the probes themselves (the default margin would let the probe error reach 0.2)
        c = balancekv.compress(K_, V_, 0.1, method="uniform", seed=0, margin=1.0)
        assert isinstance(c, balancekv.CompressedKV)
        assert c.diagnostics["error"] <= 0.1
        assert np.all(c.diagnostics["error_per_head"] <= 0.1)
        assert c.ratio < 1.0  # bounded-norm data is easy enough to compress at 10%
        probes = no_query_probes(K, 0)  # the fitted probes of seed 0 (on torch: the same, moved to K_'s device)
        err = relative_error(
            np.asarray(c.attend(probes if K_ is K else torch.from_numpy(probes).float())), attention(probes, K, V)
        )
        assert err.mean() <= 0.1 + 1e-5


def test_heads_get_different_levels_and_padding(kv_factory):
    """An easy head (constant values) and a hard head end up with different sizes."""
    K, V, _ = kv_factory("gaussian", heads=2, n=256, d=8, seed=3)
    V = V.copy()
    V[0] = 1.0  # attention output is exactly 1 whatever is kept: the most compressed level passes
    c = balancekv.compress(K, V, 0.05, method="uniform", seed=0)
    kept = c.kept()
    assert kept[0] < kept[1]
    assert c.keys.shape[-2] == kept.max()
    lv = c.diagnostics["level_per_head"]
    assert lv[0] > lv[1]
    # the padding rows carry -inf in both sets and bill nothing
    nl = c.num_logw
    assert np.isneginf(nl[0]).sum() == c.keys.shape[-2] - kept[0]


def test_keep_mode_uses_same_level_as_eps_mode(kv_factory):
    K, V, _ = kv_factory("bounded", heads=1, n=128, d=8, seed=0)
    e = balancekv.compress(K, V + 1.0, 0.2, method="uniform", seed=4)
    assert e.diagnostics["level_per_head"][0] > 0
    lvl = e.diagnostics["levels"][int(e.diagnostics["level_per_head"][0])]
    k = balancekv.compress(K, V + 1.0, keep=lvl["keep"], method="uniform", seed=4)
    np.testing.assert_array_equal(e.keys, k.keys)


def test_unreachable_eps_falls_back_to_exact(kv_factory):
    K, V, _ = kv_factory("gaussian", heads=2, n=64, d=8, seed=0)
    c = balancekv.compress(K, V, 1e-9, method="uniform", seed=0)
    assert np.all(c.kept() == 64)
    assert c.diagnostics["error"] == 0.0


def test_exact_theorem_mode_is_exact(kv_factory):
    K, V, Q = kv_factory("gaussian", heads=2, n=64, d=8, seed=0)
    c = balancekv.compress(K, V, 0.1, method="exact", guarantee="theorem")
    np.testing.assert_allclose(c.attend(Q), attention(Q, K, V), rtol=1e-12)
    assert c.diagnostics["theorem_exact"]


def test_streaming_decode_keeps_budget(kv_factory):
    K, V, Q = kv_factory("gaussian", heads=2, n=200, d=8, seed=0)
    c = balancekv.compress(K[:, :100], V[:, :100], keep=0.2, method="streaming", sink=4)
    for t in range(100, 200, 10):
        c.append(K[:, t : t + 10], V[:, t : t + 10])
        assert np.all(c.kept() == 20)
    pos = c.positions[0]
    # the window is a ring buffer: slots hold the last 16 tokens in some order (positions say which)
    assert list(pos[:4]) == [0, 1, 2, 3] and sorted(pos[4:].tolist()) == list(range(184, 200))
    # the sink + window cache attends exactly over the tokens it holds
    idx = pos
    np.testing.assert_allclose(c.attend(Q), attention(Q, K[:, idx], V[:, idx]), rtol=1e-10)


def test_diagnostics_contents(kv_factory):
    K, V, _ = kv_factory("gaussian", heads=2, n=64, d=8, seed=0)
    c = balancekv.compress(K, V, 0.2, method="uniform", seed=9)
    d = c.diagnostics
    for key in ("method", "seed", "eps", "levels", "level_per_head", "error_per_head", "error", "retries", "probes"):
        assert key in d
    assert d["seed"] == 9 and d["method"] == "uniform" and d["probes"] == 64
