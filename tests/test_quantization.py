"""Asymmetric min-max quantization [KIVI] (SPEC section 6): rounding contract, error bounds, storage, policies.

The bounds checked here are the functions of ``balancekv/bounds/quantization.py``
(Theorems Q1-Q3 of ``proofs/quantization.md``); they are deterministic, so every
generated input must satisfy them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from balancekv.reference.quantization import dequantize, quantize
from balancekv.reference.softmax_attention import weighted_attention
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import balancekv as bk
import balancekv.synthetic
from balancekv._arrays import Kind
from balancekv.bounds.quantization import (
    attention_error_bound,
    element_error_bound,
    element_float_slack,
    logit_error_bound,
)
from balancekv.quantized import QuantizedStream, QuantStore
from balancekv.storage import Segment

FP16_MAX = 6.0e4


def _data(seed, shape, centre, log_spread, const_frac):
    """Groups with a common offset, a spread 10**log_spread, and some constant rows/columns."""
    rng = np.random.default_rng(seed)
    x = centre + (10.0**log_spread) * rng.uniform(-1, 1, size=shape)
    if const_frac:
        x[..., : max(1, int(const_frac * shape[-2])), :] = centre  # some constant key groups
        x[..., :, : max(1, int(const_frac * shape[-1]))] = centre  # some constant value groups
    return np.clip(x, -FP16_MAX, FP16_MAX)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from([-2, -1]),
    group=st.sampled_from([1, 2, 4, 8, 16]),
    centre=st.sampled_from([0.0, 1.0, -3.0e4, 5.0e4, 1e-6]),
    log_spread=st.floats(-12, 4.7),
    const_frac=st.sampled_from([0.0, 0.25]),
    seed=st.integers(0, 2**31),
    scale_dtype=st.sampled_from([np.float16, np.float32]),
)
def test_element_error_bound_random(bits, axis, group, centre, log_spread, const_frac, seed, scale_dtype):
    """Theorem Q1: |x - x^| <= scale/2 + slack per element (SPEC 6), huge, tiny and constant groups."""
    x = _data(seed, (2, 16, 16), centre, log_spread, const_frac)
    x0 = x.copy()
    codes, scale, zero = quantize(x, bits, group, axis, scale_dtype)
    np.testing.assert_array_equal(x, x0)
    xh = dequantize(codes, scale, zero, group, axis)
    assert np.all(np.isfinite(xh))
    assert codes.max() <= 2**bits - 1
    bound = element_error_bound(x, scale, zero, bits, group, axis)
    assert np.all(np.abs(x - xh) <= bound)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float64, (4, 8), elements=st.floats(-FP16_MAX, FP16_MAX, allow_subnormal=True)),
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from([-2, -1]),
    group=st.sampled_from([1, 2, 4]),
)
def test_element_error_bound_adversarial_values(x, bits, axis, group):
    """Theorem Q1 on Hypothesis-chosen entries (zeros, subnormals, repeated values, extremes)."""
    codes, scale, zero = quantize(x, bits, group, axis)
    xh = dequantize(codes, scale, zero, group, axis)
    assert np.all(np.abs(x - xh) <= element_error_bound(x, scale, zero, bits, group, axis))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), k=st.integers(-14, 6), zexp=st.integers(-4, 6), seed=st.integers(0, 2**20))
def test_exact_halfway_points_round_up(bits, k, zexp, seed):
    """Half-way points x = zero + (c + 1/2) * scale get code c + 1 (half up) and error exactly scale/2.

    Group: min = zero = integer * 2**zexp, max = zero + Q * 2**k, so scale = 2**k and zero are
    exact in fp16 and float32 (and so are the half-way points): no float slack arises.
    """
    Q = 2**bits - 1
    rng = np.random.default_rng(seed)
    zero = float(rng.integers(-8, 8)) * 2.0**zexp
    s = 2.0**k
    c = rng.integers(0, Q, size=6)  # codes 0..Q-1, so c+1 <= Q
    x = np.concatenate([[zero, zero + Q * s], zero + (c + 0.5) * s])[None, :]
    codes, scale, z = quantize(x, bits, x.shape[-1], -1)
    assert float(scale[0, 0]) == s and float(z[0, 0]) == zero
    np.testing.assert_array_equal(codes[0, 2:], c + 1)
    xh = dequantize(codes, scale, z, x.shape[-1], -1)
    np.testing.assert_array_equal(np.abs(x - xh)[0, 2:], s / 2)


def test_round_half_up_not_half_even():
    """Group [0, 3] at 2 bits: scale 1, and 0.5, 1.5, 2.5 map to codes 1, 2, 3 (half-even would give 0, 2, 2)."""
    x = np.array([[0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 2.0, 0.25]])
    codes, scale, zero = quantize(x, 2, 8, -1)
    assert codes[0].tolist() == [0, 3, 1, 2, 3, 1, 2, 0]
    assert float(scale[0, 0]) == 1.0 and float(zero[0, 0]) == 0.0


@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_constant_group(scale_dtype):
    """max == min: scale 0, codes 0, reconstruction exactly min (min representable), never NaN."""
    x = np.array([[1.25] * 8 + [-7.0] * 8, [3.0] * 16], np.float32)
    codes, scale, zero = quantize(x, 2, 8, -1, scale_dtype)
    assert np.all(scale == 0) and np.all(codes == 0)
    np.testing.assert_array_equal(dequantize(codes, scale, zero, 8, -1), x)


def test_codes_follow_the_float32_contract():
    """Codes equal an element-by-element evaluation of the documented float32 recipe (SPEC 11: bit-exact)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 4)) * 7.3 + 100.0
    for bits in (2, 4, 8):
        codes, scale, zero = quantize(x, bits, 4, -2)
        Q = np.float32(2**bits - 1)
        for h in range(2):
            for gi in range(2):
                for ch in range(4):
                    grp = x[h, 4 * gi : 4 * gi + 4, ch].astype(np.float32)
                    s = np.float16((grp.max() - grp.min()) / Q)
                    z = np.float16(grp.min())
                    assert scale[h, gi, ch] == s and zero[h, gi, ch] == z
                    for t in range(4):
                        y = (grp[t] - np.float32(z)) / np.float32(s)
                        c = min(max(np.floor(y + np.float32(0.5)), 0), Q)
                        assert codes[h, 4 * gi + t, ch] == int(c)


def test_fp16_scale_rounding_slack_is_what_the_bound_charges():
    """The slack is dominated by Q * |s - (M-m)/Q| (fp16 scale rounding): about 2^-11 * Q * s at 8 bits.

    Checks the stated order of magnitude: slack/scale <= 2^-11 * (Q + 1) + 2^-11 * |m|/scale + 1e-5.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64, 32))
    for bits in (2, 4, 8):
        Q = 2**bits - 1
        codes, scale, zero = quantize(x, bits, 32, -1)
        sl = element_float_slack(x, scale, zero, bits, 32, -1)
        s = np.repeat(scale.astype(np.float64), 32, axis=-1)
        m = np.repeat(x.reshape(4, 64, 1, 32).min(-1), 32, axis=-1)
        assert np.all(sl / s <= 2.0**-11 * (Q + 1) + 2.0**-11 * np.abs(m) / s + 1e-5)


def test_bad_input():
    x = np.ones((4, 8))
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 3, 4, -1)
    with pytest.raises(ValueError, match="group"):
        quantize(x, 2, 3, -1)
    with pytest.raises(TypeError, match="x"):
        quantize(np.ones((4, 8), int), 2, 4, -1)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.full((4, 8), np.nan), 2, 4, -1)
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(np.full((4, 8), 1e5), 2, 4, -1)
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(x, 2, 4, -1, np.float64)
    assert np.all(np.isfinite(dequantize(*quantize(np.full((4, 8), 1e5), 2, 4, -1, np.float32), 4, -1)))


# ---------------------------------------------------------------- logit and attention bounds
def _quantized_attention_case(seed, bits, G, family, weights):
    K, V, Q = bk.synthetic.make_kv(family, heads=2, n=64, d=16, q=8, seed=seed)
    K = K * 3.0
    kc, ks, kz = quantize(K, bits, G, -2)
    vc, vs, vz = quantize(V, bits, G, -1)
    Kh, Vh = dequantize(kc, ks, kz, G, -2), dequantize(vc, vs, vz, G, -1)
    lw = np.random.default_rng(seed).normal(size=K.shape[:-1]) if weights else np.zeros(K.shape[:-1])
    scale = 1 / 4.0
    z = weighted_attention(Q, K, V, lw, lw, scale)
    zh = weighted_attention(Q, Kh, Vh, lw, lw, scale)
    kerr = element_error_bound(K, ks, kz, bits, G, -2)
    return K, V, Q, Kh, Vh, z, zh, kerr, scale


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    bits=st.sampled_from([2, 4, 8]),
    G=st.sampled_from([4, 8, 16]),
    family=st.sampled_from(["gaussian", "llm", "clustered"]),
    weights=st.booleans(),
)
def test_logit_and_attention_bounds(seed, bits, G, family, weights):
    """Theorems Q2 and Q3 (SPEC 6), deterministic: |Δa_i| <= Δ_i = scale Σ_l |q_l| e_il and
    ||z^ - z|| <= (e^{2Δ} - 1) max||v^_i|| + max||v_i - v^_i||, also with arbitrary single-set log-weights.

    Tolerance 1e-9 * (1 + max||v||) only absorbs float64 evaluation of the two attentions.
    """
    K, V, Q, Kh, Vh, z, zh, kerr, scale = _quantized_attention_case(seed, bits, G, family, weights)
    for h in range(K.shape[0]):
        for j in range(Q.shape[1]):
            q = Q[h, j]
            Delta_i = logit_error_bound(q, kerr[h], scale)
            actual = np.abs(scale * (K[h] - Kh[h]) @ q)
            assert np.all(actual <= Delta_i * (1 + 1e-12) + 1e-300)
            # SPEC's form with e_il = s/2 differs only by the float slack
            half = np.repeat(quantize(K, bits, G, -2)[1].astype(np.float64), G, axis=-2)[h] / 2
            assert np.all(logit_error_bound(q, half, scale) <= Delta_i)
            bound = attention_error_bound(
                Delta_i.max(), np.linalg.norm(Vh[h], axis=-1).max(), np.linalg.norm(V[h] - Vh[h], axis=-1).max()
            )
            tol = 1e-9 * (1 + np.linalg.norm(V[h], axis=-1).max())
            assert np.linalg.norm(zh[h, j] - z[h, j]) <= bound + tol


# ---------------------------------------------------------------- storage
def test_quant_store_nbytes_two_bit_group16_is_four_bits_per_element():
    """2-bit codes + fp16 scale and zero per group of 16 = 4 bits per element, to the byte (SPEC 7).

    A store bills what it holds: int32 words (a partly filled last word counts whole) and fp16
    scales and zeros."""
    H, n, d = 3, 80, 32
    K, V, _ = bk.synthetic.make_kv("gaussian", heads=H, n=n, d=d, seed=1)
    ks = QuantStore.quantize(K, 2, 16, -2)
    vs = QuantStore.quantize(V, 2, 16, -1)
    assert ks.nbytes() == H * n * d * 4 // 8  # 80 tokens x 2 bits = 5 whole words per channel
    assert vs.nbytes() == H * n * d * 4 // 8  # 32 channels x 2 bits = 2 words per token
    # 72 tokens per channel: 144 bits -> 5 int32 words (the last one partly filled), 72/16 is not whole:
    # use group 8 (9 groups); scale + zero fp16 per (group, channel)
    ks72 = QuantStore.quantize(K[:, :72], 2, 8, -2)
    assert ks72.nbytes() == H * d * (5 * 4 + 9 * 2 * 2)
    # torch stores hold the same bytes
    kt = QuantStore.quantize(torch.from_numpy(K), 2, 16, -2, backend="torch")
    assert kt.nbytes() == ks.nbytes()


def test_quant_store_torch_matches_numpy_and_reshapes():
    K, _, _ = bk.synthetic.make_kv("llm", heads=4, n=64, d=16, seed=2)
    for axis in (-2, -1):
        st_ = QuantStore.quantize(K, 4, 16, axis)
        t = st_.to_kind(Kind("torch", torch.float64, torch.device("cpu")))
        assert t.packed.dtype == torch.int32 and t.scale.dtype == torch.float16
        np.testing.assert_array_equal(t.dense().numpy(), st_.dense())
        back = t.to_kind(Kind("numpy", np.float64))
        np.testing.assert_array_equal(back.dense(), st_.dense())
        r = st_.reshape_lead((2, 2))
        assert r.shape == (2, 2, 64, 16)
        np.testing.assert_array_equal(r.dense().reshape(4, 64, 16), st_.dense())


# ---------------------------------------------------------------- decode policies
@pytest.mark.parametrize("policy", ["kivi", "kivi-batched"])
def test_kivi_policy_windows(policy):
    """kivi: exactly R full-precision values once n > R (kivi-batched: R to R + G - 1, the oldest G quantized
    together); key buffer < R; key groups only from whole blocks."""
    H, d, R, G = 2, 16, 32, 8
    K, V, _ = bk.synthetic.make_kv("gaussian", heads=H, n=300, d=d, seed=3)
    st_ = QuantizedStream(K[:, :70], V[:, :70], np.arange(70), bits=2, group=G, residual=R, policy=policy)
    assert (st_.nk, st_.nv) == (64, 38)
    n = 70
    for step in (1, 1, 5, 3, 40, 1, 3):  # 5 + 3: a flush with over % G != 0
        segs = st_.append(K[:, n : n + step], V[:, n : n + step], np.arange(n, n + step))
        n += step
        if policy == "kivi":
            assert st_.nv == n - R
        else:
            assert R <= n - st_.nv < R + G and (st_.nv - 38) % G == 0
        assert st_.nk % R == 0 and 0 <= n - st_.nk < R
        (seg,) = segs
        assert seg.m == n
        np.testing.assert_array_equal(seg.positions[0], np.arange(n))
        err = np.abs(np.asarray(seg.keys.dense()) - K[:, :n])
        assert np.all(err[:, st_.nk :] == 0) and np.all(
            np.abs(np.asarray(seg.values.dense()) - V[:, :n])[:, st_.nv :] == 0
        )


@pytest.mark.parametrize("policy", ["kivi", "kivi-batched", "minikv"])
def test_stream_flat_parts_are_the_parts_cut_from_its_segments(policy):
    """A decode step takes the stream's attention parts from ``QuantizedStream.flat_parts`` (cut from its buffers
    directly); they must be the parts :func:`store_parts` cuts from its segments: the same cuts, the same packed
    codes read at the same offsets, the same residual slots, and the same estimate. Checked after pushes that
    flush keys and values (kivi: the value window moves every step, so the cuts at nv, nk and n all differ)."""
    import importlib

    from balancekv.quantized import store_parts

    da = importlib.import_module("balancekv.fast.decode_attention")
    H, d, R, G = 2, 16, 32, 8
    K, V, Q = (torch.from_numpy(x).float() for x in bk.synthetic.make_kv("gaussian", heads=H, n=200, d=d, q=3, seed=7))
    pos = torch.arange(200)
    st_ = QuantizedStream(K[:, :70], V[:, :70], pos[:70], bits=2, group=G, residual=R, policy=policy)
    n, cuts_seen = 70, set()
    for step in (1, 5, 3, 40, 1, 17):
        st_.push(K[:, n : n + step], V[:, n : n + step], pos[n : n + step])
        n += step
        got = st_.flat_parts()
        want = [p for sg in st_.segments() for p in store_parts(sg, H)]
        assert len(got) == len(want) and sum(p[2].shape[-1] for p in got) == n
        cuts_seen.add(len(got))
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                if isinstance(b, da.Packed):
                    assert isinstance(a, da.Packed)
                    fields = lambda P: (P.axis, P.n, P.offset, P.bits, P.group, P.f)
                    assert fields(a) == fields(b)
                    assert torch.equal(a.dense(), b.dense())
                else:
                    assert not isinstance(a, da.Packed) and torch.equal(a, b)
        torch.testing.assert_close(da.attend_parts(Q, got, backend="torch"), da.attend_parts(Q, want, backend="torch"))
    assert cuts_seen == ({2} if policy == "minikv" else {3})  # minikv: keys and values flush together


def test_minikv_policy_flushes_in_blocks():
    H, d, R, G = 2, 16, 32, 16
    K, V, _ = bk.synthetic.make_kv("gaussian", heads=H, n=200, d=d, seed=4)
    st_ = QuantizedStream(K[:, :75], V[:, :75], np.arange(75), bits=2, group=G, residual=R, policy="minikv")
    assert (st_.nk, st_.nv) == (64, 64)
    n = 75
    for _ in range(40):
        st_.append(K[:, n : n + 1], V[:, n : n + 1], np.array([n]))
        n += 1
        assert st_.nk == st_.nv and (st_.nk - 64) % R == 0 and n - st_.nk < R + G


def test_quant_method_levels_and_refusals():
    K, V, Q = bk.synthetic.make_kv("gaussian", heads=2, n=256, d=32, q=8, seed=5)
    with pytest.raises(ValueError, match="keep"):
        bk.compress(K, V, keep=0.5, method="quant")
    with pytest.raises(ValueError, match="bits"):
        bk.compress(K, V, keep=1.0, method="quant", bits=3)
    with pytest.raises(ValueError, match="residual"):
        bk.compress(K, V, keep=1.0, method="quant", residual=40)
    exact = bk.attention(Q, K, V)
    errs = []
    for b in (8, 4, 2):
        c = bk.compress(K, V, keep=1.0, method="quant", bits=b, residual=64, seed=0)
        errs.append(float(bk.reference.relative_error(c.attend(Q), exact).mean()))
        # held bytes, float64 input: keys all 256 quantized (256 % 64 == 0), codes + fp16 scale and zero
        # per (group of 32 tokens, channel); values 192 quantized (codes + one fp16 scale/zero per token),
        # the last 64 in float64; one float64 log-weight and one int32 position per slot
        n, d = 256, 32
        keys = n * d * b // 8 + (n // 32) * d * 2 * 2
        values = 192 * (d * b // 8 + 2 * 2) + 64 * d * 8
        assert c.nbytes == 2 * (keys + values + n * 8 + n * 4)
    # each halving of the bits multiplies the step (2^b - 1) by about 16 and 5: errors follow
    assert errs[0] < errs[1] / 8 and errs[1] < errs[2] / 3 and errs[2] < 1
    c = bk.compress(K, V, eps=errs[1] * 1.01, method="quant", seed=0)
    assert c.diagnostics["levels"][1:] == [{"bits": 8}, {"bits": 4}, {"bits": 2}]
    assert c.diagnostics["error"] <= errs[1] * 1.01


def test_quant_cache_decodes_and_torch_kind():
    K, V, Q = bk.synthetic.make_kv("gaussian", heads=2, n=100, d=32, q=4, seed=6)
    c = bk.compress(torch.from_numpy(K), torch.from_numpy(V), keep=1.0, method="quant", residual=32, seed=0)
    assert isinstance(c.keys, torch.Tensor)
    K2, V2, _ = bk.synthetic.make_kv("gaussian", heads=2, n=40, d=32, q=4, seed=7)
    for i in range(40):
        c.append(torch.from_numpy(K2[:, i : i + 1]), torch.from_numpy(V2[:, i : i + 1]))
    assert c.n_seen == 140 and int(c.kept().min()) == 140
    Kall, Vall = np.concatenate([K, K2], 1), np.concatenate([V, V2], 1)
    out = c.attend(torch.from_numpy(Q)).numpy()
    err = bk.reference.relative_error(out, bk.attention(Q, Kall, Vall)).mean()
    assert err < 1.0
    # after 40 decode steps with R=32, G=32: keys 128 quantized + 12 float64, values 108 quantized + 32 float64
    # (the input is float64), float64 log-weights and int32 positions: what the tokens need ...
    need = (128 * 32 * 2 // 8 + 4 * 32 * 4) + 108 * (32 * 2 // 8 + 4) + (12 + 32) * 32 * 8 + 140 * 12
    # ... plus spare capacity, bounded by the policy: each residual buffer at most 2R tokens, slots and
    # codes grown by at most max(R, a quarter) tokens
    spare = 2 * (2 * 32) * 32 * 8 + 35 * 12 + 2 * 35 * (32 * 2 // 8 + 4 + 2)
    assert 2 * need <= c.nbytes <= 2 * (need + spare)
    segs = c.segments
    assert any(isinstance(s, Segment) for s in segs)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_kivi_batched_stores_the_codes_kivi_stores(kind):
    """Values are quantized per token, so batching when they are quantized changes no code: after the same appends,
    the tokens both policies hold quantized dequantize to the same values, and kivi-batched holds the rest exactly.
    The last assertion fails if kivi-batched flushed at every step (it would be kivi)."""
    H, d, R, G = 2, 16, 32, 8
    K, V, _ = bk.synthetic.make_kv("gaussian", heads=H, n=200, d=d, seed=6)
    if kind == "torch":
        K, V = torch.from_numpy(K).float(), torch.from_numpy(V).float()
    a = QuantizedStream(K[:, :70], V[:, :70], np.arange(70), bits=2, group=G, residual=R, policy="kivi")
    b = QuantizedStream(K[:, :70], V[:, :70], np.arange(70), bits=2, group=G, residual=R, policy="kivi-batched")
    n = 70
    for _ in range(45):
        a.append(K[:, n : n + 1], V[:, n : n + 1], np.array([n]))
        b.append(K[:, n : n + 1], V[:, n : n + 1], np.array([n]))
        n += 1
        assert b.nv <= a.nv
        host = lambda x: x.numpy() if kind == "torch" else np.asarray(x)
        va, vb = (host(st_.segments()[0].values.dense()) for st_ in (a, b))
        np.testing.assert_array_equal(va[:, : b.nv], vb[:, : b.nv])
        np.testing.assert_array_equal(vb[:, b.nv :], host(V[:, b.nv : n]))
        np.testing.assert_array_equal(host(a.segments()[0].keys.dense()), host(b.segments()[0].keys.dense()))
    assert a.nv - b.nv > 0  # the check above met a state where kivi-batched had not flushed yet
