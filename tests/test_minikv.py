"""MiniKV (H2O selection + pyramid budgets + 2-bit KIVI storage) and BalanceKV + quantization (SPEC 6-8)."""

from __future__ import annotations

import numpy as np
import pytest
from balancekv.reference.quantization import quantize
from balancekv.reference.selection import h2o_scores, pyramid_budgets, select_top
from balancekv.reference.softmax_attention import weighted_attention

import balancekv as bk
from balancekv.bounds.quantization import attention_error_bound, element_error_bound, logit_error_bound
from balancekv.methods import get_method
from balancekv.methods.base import Context
from balancekv.synthetic import make_kv


def test_minikv_keeps_h2o_selection_and_bills_four_bits():
    """Kept set = recent window + top H2O scores; bytes = 4 bits/element (2-bit, G=16, fp16 scale+zero)
    for every quantized token plus fp16 for the remainder m % 16, to the byte (SPEC 7)."""
    H, n, d = 2, 200, 32
    K, V, Q = make_kv("llm", heads=H, n=n, d=d, q=8, seed=1)
    c = bk.compress(K, V, keep=0.5, method="minikv", seed=0, sink=0)  # no sink: H2O's published selection
    m = 100
    np.testing.assert_array_equal(c.positions, select_top(h2o_scores(K, K), m, 50))
    assert set(range(150, 200)) <= set(c.positions[1].tolist())
    q, r = 96, 4  # 100 = 6 * 16 + 4
    # held bytes: 4 bits per quantized element, the remainder in the input's float64, and one float64
    # log-weight and one int32 position per slot
    assert c.nbytes == H * (q * 2 * d * 4 // 8 + r * 2 * d * 8 + m * (8 + 4))
    # the quantized tokens really are quantized; the remainder is exact
    Ks = np.take_along_axis(K, c.positions[..., None], 1)
    assert np.all(np.asarray(c.keys)[:, q:] == Ks[:, q:]) and not np.all(np.asarray(c.keys)[:, :q] == Ks[:, :q])


def test_minikv_layer_budgets():
    K, V, _ = make_kv("gaussian", heads=2, n=256, d=16, seed=2)
    L = 8
    ratios = pyramid_budgets(0.5, L, 7.0)
    kept = [int(bk.compress(K, V, keep=0.5, method="minikv", layer=l, layers=L, seed=0).kept()[0]) for l in range(L)]
    assert kept == [max(1, int(round(r * 256))) for r in ratios]
    assert abs(np.mean(kept) / 256 - 0.5) < 1.0 / 256
    with pytest.raises(ValueError, match="layer"):
        bk.compress(K, V, keep=0.5, method="minikv", layer=3)
    with pytest.raises(ValueError, match="layer"):
        bk.compress(K, V, keep=0.5, method="minikv", layer=8, layers=8)


def test_minikv_eps_levels_and_decode():
    K, V, Q = make_kv("llm", heads=3, n=256, d=16, q=8, seed=3)
    c = bk.compress(K, V, eps=0.1, method="minikv", residual=32, seed=0)
    lv = c.diagnostics["levels"][1:]
    est = [x["keep"] * (x["bits"] + 2.0) for x in lv]
    assert est == sorted(est, reverse=True) and {x["bits"] for x in lv} == {2, 4, 8}
    # the eps rule: margin x the (fitted-probe) error <= eps; the margin without queries is 0.6, so the error itself
    # may exceed eps (along the per-bits ladders this picks keep 1/4 at 8 bits: errors 0.095-0.130, bounds <= 0.078)
    assert np.all(c.diagnostics["error_bound_per_head"] <= 0.1)
    assert np.all(c.diagnostics["error_per_head"] < 1.0)
    assert np.all(c.diagnostics["level_per_head"] > 0) and c.ratio < 0.25
    # decoding (one level for every head): tokens wait in full precision and are flushed in blocks of
    # R = 32 (keys and values together); every appended token is kept
    c = bk.compress(K, V, keep=0.25, method="minikv", residual=32, seed=0)
    K2, V2, _ = make_kv("llm", heads=3, n=40, d=16, seed=4)
    kept0 = c.kept()
    for i in range(40):
        c.append(K2[:, i : i + 1], V2[:, i : i + 1])
    assert c.n_seen == 296
    np.testing.assert_array_equal(c.kept(), kept0 + 40)
    (seg,) = c.segments
    assert seg.meta["quantized_keys"] == seg.meta["quantized_values"] == 64 + 32  # prefill 64 = 4 x 16, one flush
    # at least: 96 tokens at 4 bits + 8 float64 tokens + weights and positions; spare capacity bounded by
    # the policy: residual buffers at most 2R tokens each, slots and codes grown by max(R, a quarter)
    need = 96 * 2 * 16 * 4 // 8 + 8 * 2 * 16 * 8 + 104 * 16
    spare = 2 * (2 * 32) * 16 * 8 + 32 * 16 + 32 * 2 * 16 * 4 // 8
    assert 3 * need <= c.nbytes <= 3 * (need + spare)
    assert np.all(np.isfinite(c.attend(Q)))


def _ctx(opts, seed=0):
    K, V, _ = make_kv("bounded", heads=2, n=320, d=16, q=8, seed=5)
    scale = 0.25
    ctx = Context(scale=scale, rng=np.random.default_rng(seed), probes=K[:, -16:], delta=0.01, opts=opts)
    return K, V, scale, ctx


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_balance_quant_is_balance_within_the_quantization_bound(bits):
    """balance+quant keeps BalanceKV's tokens and weights; its estimate differs from BalanceKV's by at most
    the Theorem Q3 bound (single-set weights), with Δ from Theorem Q2 on the element bounds of Q1."""
    bq = get_method("balance+quant")
    opts = bq.resolve_options({"group": 16})
    K, V, scale, ctx = _ctx(opts)
    built_q = bq.build(K, V, {"keep": 0.25, "bits": bits}, ctx)
    bal = get_method("balance")
    _, _, _, ctx_b = _ctx(bal.resolve_options({}))
    built_b = bal.build(K, V, {"keep": 0.25}, ctx_b)
    (sq,), (sb,) = built_q.segments, built_b.segments
    np.testing.assert_array_equal(sq.positions, sb.positions)
    np.testing.assert_array_equal(sq.num_logw, sb.num_logw)
    Kb, Vb = np.asarray(sb.keys.dense()), np.asarray(sb.values.dense())
    Kq, Vq = np.asarray(sq.keys.dense()), np.asarray(sq.values.dense())
    mq = (Kb.shape[1] // 16) * 16
    _, ks, kz = quantize(Kb[:, :mq], bits, 16, -2)
    kerr = np.zeros_like(Kb)
    kerr[:, :mq] = element_error_bound(Kb[:, :mq], ks, kz, bits, 16, -2)
    _, Vx, Qx = make_kv("bounded", heads=2, n=320, d=16, q=8, seed=6)
    lw = np.asarray(sb.num_logw)
    zb = weighted_attention(Qx, Kb, Vb, lw, lw, scale)
    zq = weighted_attention(Qx, Kq, Vq, lw, lw, scale)
    for h in range(2):
        for j in range(8):
            Delta = logit_error_bound(Qx[h, j], kerr[h], scale).max()
            bound = attention_error_bound(
                Delta, np.linalg.norm(Vq[h], axis=-1).max(), np.linalg.norm(Vb[h] - Vq[h], axis=-1).max()
            )
            assert np.linalg.norm(zq[h, j] - zb[h, j]) <= bound + 1e-9


def test_balance_quant_bytes_and_levels():
    K, V, _ = make_kv("gaussian", heads=2, n=512, d=32, seed=7)
    c = bk.compress(K, V, keep=0.25, method="balance+quant", bits=4, seed=0)
    m = int(c.kept()[0])
    n_mid = m - 64  # sink 32 + window 32 exact-weight tokens
    qd = (m // 32) * 32
    per_head = qd * 32 * 4 // 8 + (qd // 32) * 32 * 4  # keys: codes + fp16 scale/zero per group
    per_head += qd * (32 * 4 // 8 + 1 * 4)  # values: per token
    per_head += (m - qd) * 32 * 2 * 8  # remainder in the input's float64
    per_head += m * (8 + 4)  # float64 log-weights, int32 positions
    assert n_mid > 0 and c.nbytes == 2 * per_head
    assert c.ratio < bk.compress(K, V, keep=0.25, method="balance", seed=0).ratio / 2
    lv = get_method("balance+quant").levels(512, get_method("balance+quant").resolve_options({}))
    assert {x["bits"] for x in lv} == {2, 4, 8} and len(lv) % 3 == 0
    with pytest.raises(TypeError, match="estimator"):
        bk.compress(K, V, keep=0.25, method="balance+quant", estimator="published")
