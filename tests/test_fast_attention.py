"""Fast decode attention against the reference estimator (SPEC sections 1, 10, 11).

Contract: ``torch.testing.assert_close`` against
:func:`balancekv.reference.softmax_attention.weighted_attention` on the same weighted
token set (GQA groups expanded for the reference), float64 to 1e-10, float32 to 1e-5,
fp16/bf16 (GPU only) to 2e-2; packed low-bit keys/values against the reference on the
dequantized arrays; ``CompressedKV.attend(backend="triton")`` against ``backend="reference"``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _fast_helpers import HAS_CUDA, needs_interpreter, triton_interpreter
from balancekv.reference.softmax_attention import weighted_attention as ref_attention

import balancekv

fd = importlib.import_module("balancekv.fast.decode_attention")
rq = importlib.import_module("balancekv.reference.quantization")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _problem(seed, B=2, Hkv=2, G=3, mq=2, n=70, d=8, s=12, two_set=True):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(B, Hkv * G, mq, d, generator=g, dtype=torch.float64)
    K = torch.randn(B, Hkv, n, d, generator=g, dtype=torch.float64) * 2
    V = torch.randn(B, Hkv, n, s, generator=g, dtype=torch.float64)
    nl = torch.randn(B, Hkv, n, generator=g, dtype=torch.float64)
    nl[..., n - 5 :] = float("-inf")  # padding slots
    dl = nl.clone()
    if two_set:  # disjoint numerator / denominator samples
        nl[..., ::3] = float("-inf")
        dl[..., 1::3] = float("-inf")
    return Q, K, V, nl, dl


def _reference(Q, K, V, nl, dl, scale, mask=None):
    G = Q.shape[-3] // K.shape[-3]
    rep = lambda t: t.repeat_interleave(G, dim=-3).numpy()  # keys/values (..., H, n, f)
    repw = lambda t: t.repeat_interleave(G, dim=-2).numpy()  # log-weights (..., H, n)
    out = ref_attention(Q.numpy(), rep(K), rep(V), repw(nl), repw(dl), scale, mask=mask)
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("two_set", [False, True])
def test_torch_decode_matches_reference(dtype, two_set):
    Q, K, V, nl, dl = _problem(1, two_set=two_set)
    out = fd.decode_attention(Q.to(dtype), K.to(dtype), V.to(dtype), nl, dl, 0.3, backend="torch")
    torch.testing.assert_close(
        out.double(),
        _reference(Q.to(dtype).double(), K.to(dtype).double(), V.to(dtype).double(), nl, dl, 0.3),
        **TOL[dtype],
    )


def test_torch_decode_causal_positions():
    Q, K, V, nl, dl = _problem(2, mq=3)
    qpos = np.array([10, 40, 69])
    out = fd.decode_attention(
        Q, K, V, nl, dl, 0.3, key_positions=torch.arange(70), query_positions=qpos, backend="torch"
    )
    mask = np.arange(70)[None, :] <= qpos[:, None]
    torch.testing.assert_close(out, _reference(Q, K, V, nl, dl, 0.3, mask=mask), **TOL[torch.float64])


def test_large_logits_do_not_overflow():
    """Keys of norm ~1e4 (SPEC section 0): finite output equal to the reference."""
    Q, K, V, nl, dl = _problem(3, two_set=False)
    K = K * 5e3
    out = fd.decode_attention(Q, K, V, nl, dl, 0.125, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(Q, K, V, nl, dl, 0.125), **TOL[torch.float64])


def test_empty_denominator_raises():
    Q, K, V, nl, dl = _problem(4, two_set=False)
    dl = torch.full_like(dl, float("-inf"))
    with pytest.raises(FloatingPointError):
        fd.decode_attention(Q, K, V, nl, dl, 0.3, backend="torch")


def test_bad_gqa_shape_named():
    Q, K, V, nl, dl = _problem(5)
    with pytest.raises(ValueError, match="multiple"):
        fd.decode_attention(Q[:, :5], K, V, nl, dl, 0.3, backend="torch")


def _packed_problem(seed, bits, n=64, d=16, s=16, Hkv=2, gk=16, gv=8):
    Q, K, V, nl, dl = _problem(seed, B=1, Hkv=Hkv, n=n, d=d, s=s, two_set=False)
    K32, V32 = K.float().numpy(), V.float().numpy()
    kc, ks, kz = rq.quantize(K32, bits, gk, -2)
    vc, vs, vz = rq.quantize(V32, bits, gv, -1)
    L = Hkv
    Kp = fd.Packed(
        torch.from_numpy(rq.pack(kc, bits, -2)).reshape(L, d, -1),
        torch.from_numpy(ks).reshape(L, -1, d),
        torch.from_numpy(kz).reshape(L, -1, d),
        bits,
        gk,
        "tokens",
        n,
        d,
    )
    Vp = fd.Packed(
        torch.from_numpy(rq.pack(vc, bits, -1)).reshape(L, n, -1),
        torch.from_numpy(vs).reshape(L, n, -1),
        torch.from_numpy(vz).reshape(L, n, -1),
        bits,
        gv,
        "channels",
        n,
        s,
    )
    Kd = torch.from_numpy(rq.dequantize(kc, ks, kz, gk, -2))
    Vd = torch.from_numpy(rq.dequantize(vc, vs, vz, gv, -1))
    return Q, Kp, Vp, Kd, Vd, nl, dl


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_torch_packed_matches_reference_on_dequantized(bits):
    Q, Kp, Vp, Kd, Vd, nl, dl = _packed_problem(6, bits)
    out = fd.decode_attention(Q[0], Kp, Vp, nl[0], dl[0], 0.25, backend="torch")
    torch.testing.assert_close(out, _reference(Q[0], Kd[0], Vd[0], nl[0], dl[0], 0.25), **TOL[torch.float64])


# ------------------------------------------------------------------ Triton under the interpreter
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_decode_interpreter_gqa_two_set_split_k(dtype):
    """GQA (3 query heads per KV head), two weight sets, padding, three splits along the tokens."""
    Q, K, V, nl, dl = _problem(7, B=1)
    with triton_interpreter():
        out = fd.decode_attention(
            Q.to(dtype), K.to(dtype), V.to(dtype), nl, dl, 0.3, backend="triton", num_splits=3, block_n=16
        )
    torch.testing.assert_close(
        out.double(),
        _reference(Q.to(dtype).double(), K.to(dtype).double(), V.to(dtype).double(), nl, dl, 0.3),
        **TOL[dtype],
    )


@needs_interpreter
@pytest.mark.parametrize("bits", [2, 8])
def test_triton_packed_interpreter(bits):
    """Packed keys (per channel, along tokens) and values (per token) dequantized in the kernel."""
    Q, Kp, Vp, Kd, Vd, nl, dl = _packed_problem(8, bits)
    qpos = np.array([20, 63])
    with triton_interpreter():
        out = fd.decode_attention(
            Q[0],
            Kp,
            Vp,
            nl[0],
            dl[0],
            0.25,
            key_positions=torch.arange(64),
            query_positions=qpos,
            backend="triton",
            num_splits=2,
            block_n=16,
        )
    mask = np.arange(64)[None, :] <= qpos[:, None]
    torch.testing.assert_close(out, _reference(Q[0], Kd[0], Vd[0], nl[0], dl[0], 0.25, mask=mask), **TOL[torch.float64])


@needs_interpreter
@pytest.mark.parametrize(
    "method,opts", [("quant", dict(bits=2, group=16, residual=32)), ("balance", {}), ("subgen", {})]
)
def test_compressed_attend_triton_matches_reference(method, opts):
    """``CompressedKV.attend(backend="triton")`` (segments -> kernel parts, packed stores read in place,
    decode-time appended tokens, causal positions) equals the reference estimator."""
    from balancekv.synthetic import make_kv

    K, V, Q = make_kv("gaussian", heads=2, n=160, d=16, q=2, seed=3)
    cache = balancekv.compress(
        torch.from_numpy(K), torch.from_numpy(V), keep=1.0 if method == "quant" else 0.5, method=method, seed=0, **opts
    )
    cache.append(torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64))
    Qt = torch.from_numpy(Q)
    pos = np.array([90, 162])
    want = cache.attend(Qt, positions=pos, backend="reference")
    with triton_interpreter():
        got = cache.attend(Qt, positions=pos, backend="triton")
    assert (
        any(isinstance(p[0], fd.Packed) for p in cache.parts()) or method != "quant"
    )  # the quantized cache really reaches the kernel packed
    torch.testing.assert_close(got, want, **TOL[torch.float64])


# ------------------------------------------------------------------ compiled kernels (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_decode_gpu_real_shapes(dtype):
    """Compiled split-K kernel, Llama-like shapes (32 query / 8 KV heads, d=128, n=4096)."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, n, d = 1, 8, 4, 4096, 128
    Q = torch.randn(B, Hkv * G, 1, d, generator=g)
    K = torch.randn(B, Hkv, n, d, generator=g)
    V = torch.randn(B, Hkv, n, d, generator=g)
    nl = torch.randn(B, Hkv, n, generator=g)
    out = fd.decode_attention(
        Q.to(dtype).cuda(), K.to(dtype).cuda(), V.to(dtype).cuda(), nl.cuda(), nl.cuda(), d**-0.5, backend="triton"
    )
    want = _reference(
        Q.to(dtype).double(), K.to(dtype).double(), V.to(dtype).double(), nl.double(), nl.double(), d**-0.5
    )
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.cpu().double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method,opts", [("quant", dict(bits=2, group=16, residual=32)), ("minikv", dict(bits=4))])
def test_torch_single_set_parts_match_reference(method, opts, dtype):
    """The CPU path for caches of one weight set (one softmax over every part's logits; packed keys, including a
    part that starts inside the key store, dequantized per call) equals the reference estimator, with and without
    causal positions."""
    from balancekv.synthetic import make_kv

    K, V, Q = make_kv("gaussian", heads=2, n=160, d=16, q=2, seed=4)
    cache = balancekv.compress(
        torch.from_numpy(K).to(dtype),
        torch.from_numpy(V).to(dtype),
        keep=1.0 if method == "quant" else 0.5,
        method=method,
        seed=0,
        **opts,
    )
    for _ in range(3):
        cache.append(torch.randn(2, 1, 16, dtype=dtype), torch.randn(2, 1, 16, dtype=dtype))
    parts = cache.parts()
    assert sum(isinstance(p[0], fd.Packed) for p in parts) >= 1
    if method == "quant":
        assert any(isinstance(p[0], fd.Packed) and p[0].offset > 0 for p in parts)  # a part inside the key store
    Qt = torch.from_numpy(Q).to(dtype)
    Kd, Vd, bias = (x.double().numpy() for x in cache.to_dense())  # the stores dequantized, one weight set
    held = cache.positions
    held = held.numpy() if isinstance(held, torch.Tensor) else np.asarray(held)
    for pos in (None, np.array([90, 162])):
        mask = None if pos is None else held[..., None, :] <= pos[:, None]
        want = ref_attention(Qt.double().numpy(), Kd, Vd, bias, bias, cache.scale, mask=mask)
        got = cache.attend(Qt, positions=pos, backend="torch")
        torch.testing.assert_close(got.double(), torch.from_numpy(np.asarray(want)), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "method,opts",
    [
        ("quant", dict(bits=2, group=16, residual=32)),
        ("minikv", dict(bits=2, group=16, residual=32)),
        ("balance+quant", dict(bits=4, group=8, residual=16)),
    ],
)
def test_quantized_decode_equals_dequantize_then_attend(method, opts, dtype):
    """A decode loop through what :mod:`balancekv.hf` calls (``append`` then ``attend_rows`` with GQA rows): every
    step equals the reference estimator on the cache's stores dequantized (``to_dense``), float64 to 1e-10, float32
    to 1e-5. The prompt length (150) and the chunked appends are aligned neither with the quantization groups nor
    with the residual window, so parts start inside the packed key store (kivi: a run of parts reading one store back
    to back, attended with one unpack) and flushes happen between the checks."""
    from balancekv.synthetic import make_kv

    Hkv, g, d = 2, 3, 16
    K, V, Q = make_kv("gaussian", heads=Hkv, n=150, d=d, q=2, seed=7)
    cache = balancekv.compress(
        torch.from_numpy(K).to(dtype)[None],
        torch.from_numpy(V).to(dtype)[None],
        keep=1.0 if method == "quant" else 0.5,
        method=method,
        seed=0,
        **opts,
    )
    gen = torch.Generator().manual_seed(3)
    runs = 0
    for step in range(40):
        t = 5 if step % 13 == 6 else 1  # a chunked append now and then (t > 1: causal inside the new tokens)
        k = torch.randn(1, Hkv, t, d, generator=gen, dtype=torch.float64).to(dtype)
        v = torch.randn(1, Hkv, t, d, generator=gen, dtype=torch.float64).to(dtype)
        cache.append(k, v)
        parts = cache.parts()
        runs += any(fd._continues(a[0], b[0]) for a, b in zip(parts, parts[1:]) if isinstance(a[0], fd.Packed))
        q = torch.randn(1, Hkv * g, t, d, generator=gen, dtype=torch.float64).to(dtype)
        qpos = torch.arange(cache.n_seen - t, cache.n_seen).repeat(g).expand(Hkv, g * t) if t > 1 else None
        got = cache.attend_rows(q.reshape(Hkv, g * t, d), query_positions=qpos)
        Kd, Vd, bias = (x.double() for x in cache.to_dense())
        rep = lambda x: x.repeat_interleave(g, dim=1)[0].numpy()  # (Hq, ...) of the KV heads
        mask = None
        if t > 1:
            held = cache.positions.repeat_interleave(g, dim=1)[0].numpy()
            mask = held[:, None, :] <= np.arange(cache.n_seen - t, cache.n_seen)[None, :, None]
        want = ref_attention(q[0].double().numpy(), rep(Kd), rep(Vd), rep(bias), rep(bias), cache.scale, mask=mask)
        want = torch.from_numpy(np.asarray(want)).reshape(Hkv, g * t, d)
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    if method == "quant":
        assert runs > 0  # the merged-run path ran
