"""Torch path of ``quant``, ``minikv``, ``balance+quant``, ``h2o`` and ``snapkv`` (issue 11; issue 15 items 5, 6).

For torch input the whole pipeline stays torch on the caller's device (no ``Tensor.numpy``
anywhere), float64 torch builds keep the reference's tokens, weights and bit-identical codes
for the same seed, float32 builds are as accurate, the cache holds what it bills (an
independent object-graph walk written here), decode appends keep every token in bounded
memory, and H2O scoring is blocked and done once per ``compress`` call.
"""

from __future__ import annotations

import gc
import tracemalloc
import types

import numpy as np
import pytest
import torch
from _fast_helpers import HAS_CUDA, needs_interpreter, triton_interpreter
from balancekv.reference import selection as rs

import balancekv as bk
from balancekv.quantized import QuantStore
from balancekv.synthetic import make_kv

METHODS = {
    "quant": dict(keep=1.0, residual=32),
    "minikv": dict(keep=0.5, residual=32),
    "balance+quant": dict(keep=0.25, residual=32, block=32, sink=8, window=8),
    "h2o": dict(keep=0.25),
    "snapkv": dict(keep=0.25, window=8),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# ---------------------------------------------------------------- an independent byte count
_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def walk_bytes(root) -> int:
    """Bytes of every tensor / ndarray reachable from ``root`` through ``gc.get_referents`` (each storage once)."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _SKIP):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[("t", st.data_ptr(), str(o.device))] = st.nbytes()
            continue
        if isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            storages[("n", base.ctypes.data)] = base.nbytes
            continue
        stack.extend(gc.get_referents(o))
    return int(sum(storages.values()))


def _data(dtype, n=160, d=32, H=2, seed=1, q=8):
    K, V, Q = make_kv("llm", heads=H, n=n, d=d, q=q, seed=seed)
    return K, V, Q, *(torch.from_numpy(x).to(dtype) for x in (K, V, Q))


@pytest.fixture
def no_numpy(monkeypatch):
    """``torch.Tensor.numpy`` and ``__array__`` raise while active (no conversion to NumPy of any kind)."""

    def boom(self, *a, **k):
        raise AssertionError("Tensor.numpy() called on the torch path")

    monkeypatch.setattr(torch.Tensor, "numpy", boom)
    monkeypatch.setattr(torch.Tensor, "__array__", boom)
    yield
    monkeypatch.undo()


# ---------------------------------------------------------------- torch all the way
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_torch_in_torch_out_without_numpy(method, dtype, no_numpy):
    K, V, Q, Kt, Vt, Qt = _data(dtype)
    c = bk.compress(Kt, Vt, method=method, seed=0, **METHODS[method])
    out = c.attend(Qt)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == Kt.device
    kept = c.kept()
    for i in range(5):
        c.append(Kt[:, i : i + 1], Vt[:, i : i + 1])
    c.append(Kt[:, :40], Vt[:, :40])
    np.testing.assert_array_equal(c.kept(), kept + 45)
    out = c.attend(Qt)
    assert isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())
    for sg in c.segments:
        for x in (sg.num_logw, sg.den_logw, sg.positions, sg.keys.dense(), sg.values.dense()):
            assert isinstance(x, torch.Tensor) and x.device == Kt.device
        assert sg.positions.dtype == torch.int32


# ---------------------------------------------------------------- float64: the reference's build
def _stores(c):
    (sg,) = c.segments
    parts = lambda st: st.parts if hasattr(st, "parts") else [st]
    return [p for p in parts(sg.keys) + parts(sg.values) if isinstance(p, QuantStore)]


def _quant_arrays(st):
    """Codes, scales and zeros of the ``m`` stored tokens (NumPy, for comparison)."""
    ng = st.m // st.group if st.axis == -2 else st.m
    host = lambda a: np.asarray(a.tolist()) if isinstance(a, torch.Tensor) else np.asarray(a)
    sc = host(st.scale[..., :ng, :].to(torch.float32)) if isinstance(st.scale, torch.Tensor) else st.scale[..., :ng, :]
    ze = host(st.zero[..., :ng, :].to(torch.float32)) if isinstance(st.zero, torch.Tensor) else st.zero[..., :ng, :]
    return host(st.codes()), np.asarray(sc, np.float32), np.asarray(ze, np.float32)


@pytest.mark.parametrize("method", list(METHODS))
def test_float64_torch_build_is_the_reference(method):
    K, V, Q, Kt, Vt, Qt = _data(torch.float64)
    opts = METHODS[method]
    ref = bk.compress(K, V, method=method, seed=3, **opts)
    fast = bk.compress(Kt, Vt, method=method, seed=3, **opts)
    np.testing.assert_array_equal(fast.positions.tolist(), ref.positions)
    np.testing.assert_array_equal(fast.num_logw.tolist(), ref.num_logw)
    np.testing.assert_array_equal(fast.den_logw.tolist(), ref.den_logw)
    sr, sf = _stores(ref) if method in ("quant", "minikv", "balance+quant") else [], []
    if sr:
        sf = _stores(fast)
        assert len(sf) == len(sr)
        for a, b in zip(sr, sf):
            for x, y in zip(_quant_arrays(a), _quant_arrays(b)):
                np.testing.assert_array_equal(x, y)
    # the same estimate (dequantization is exact in float64 on both paths)
    np.testing.assert_allclose(fast.attend(Qt).tolist(), ref.attend(Q), rtol=1e-10, atol=1e-12)
    # and after the same decode appends
    for i in range(37):
        ref.append(K[:, i : i + 1], V[:, i : i + 1])
        fast.append(Kt[:, i : i + 1], Vt[:, i : i + 1])
    np.testing.assert_array_equal(fast.positions.tolist(), ref.positions)
    np.testing.assert_allclose(fast.attend(Qt).tolist(), ref.attend(Q), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", list(METHODS))
def test_float32_error_within_1_1x_of_the_reference(method):
    K, V, Q, Kt, Vt, Qt = _data(torch.float32, n=256, seed=4)
    exact = bk.attention(Q, K, V)
    opts = METHODS[method]
    e_ref = float(bk.reference.relative_error(bk.compress(K, V, method=method, seed=0, **opts).attend(Q), exact).mean())
    out = bk.compress(Kt, Vt, method=method, seed=0, **opts).attend(Qt)
    e32 = float(bk.reference.relative_error(np.asarray(out.tolist()), exact).mean())
    assert e32 <= 1.1 * e_ref + 1e-6, (e32, e_ref)


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_held_bytes_match_nbytes(method, dtype):
    K, V, Q, Kt, Vt, Qt = _data(dtype, n=256)
    c = bk.compress(Kt, Vt, method=method, seed=0, **METHODS[method])
    assert walk_bytes(c) <= 1.10 * c.nbytes
    for i in range(50):
        c.append(Kt[:, i : i + 1], Vt[:, i : i + 1])
    assert walk_bytes(c) <= 1.10 * c.nbytes
    if method in ("quant", "minikv", "balance+quant"):  # the residual is held in the caller's dtype
        st = c._stream.stream
        assert st.kres.buf.dtype == dtype and st.vres.buf.dtype == dtype


@pytest.mark.parametrize("method", ["minikv", "balance+quant"])
def test_quarter_kept_holds_under_0_15_of_the_fp16_cache(method):
    H, n, d = 2, 1024, 64
    K, V, _ = make_kv("llm", heads=H, n=n, d=d, seed=5)
    Kt, Vt = torch.from_numpy(K).half(), torch.from_numpy(V).half()
    c = bk.compress(Kt, Vt, keep=0.25, method=method, seed=0)
    full = H * n * 2 * d * 2  # keys and values in fp16
    assert walk_bytes(c) <= 0.15 * full
    assert c.nbytes <= 0.15 * full


def test_reference_path_holds_what_it_bills():
    K, V, _ = make_kv("llm", heads=2, n=200, d=32, seed=6)
    for method in ("quant", "minikv"):
        c = bk.compress(K.astype(np.float32), V.astype(np.float32), method=method, seed=0, **METHODS[method])
        st = c._stream.stream
        assert st.kres.buf.dtype == np.float32  # adopted the caller's dtype: no float64 copy kept
        assert walk_bytes(c) <= 1.10 * c.nbytes


# ---------------------------------------------------------------- decode policies on the torch path
@pytest.mark.parametrize("policy", ["kivi", "kivi-batched", "minikv"])
def test_many_appends_keep_every_token_in_bounded_memory(policy):
    H, n, d, R, G = 2, 100, 32, 32, 16
    K, V, _ = make_kv("gaussian", heads=H, n=n + 700, d=d, seed=7)
    Kt, Vt = torch.from_numpy(K).float(), torch.from_numpy(V).float()
    c = bk.compress(Kt[:, :n], Vt[:, :n], keep=1.0, method="quant", residual=R, group=G, policy=policy, seed=0)
    st = c._stream.stream
    seen, t = [], n
    for step in [1] * 300 + [100, 1, 250, 1, 1, 47]:
        c.append(Kt[:, t : t + step], Vt[:, t : t + step])
        t += step
        seen.append(st.kq.packed)  # kept alive, so a new buffer cannot reuse an old address
        # every token kept, in stream order
        assert c.n_seen == t and c.kept().tolist() == [t, t]
        if policy == "kivi":
            assert len(st.vres) == R and 0 <= len(st.kres) < R and st.nk % R == 0
        elif policy == "kivi-batched":
            assert R <= len(st.vres) < R + G and 0 <= len(st.kres) < R and st.nk % R == 0
        else:
            assert len(st.kres) == len(st.vres) < R and st.nk == st.nv
        # the residual buffers stay bounded by the policy (chunks of <= R tokens: at most 2R + G - 1 live, in a
        # buffer grown 1.5x)
        assert st.kres.buf.shape[-2] <= 3 * R + 2 * G and st.vres.buf.shape[-2] <= 3 * R + 2 * G
        # quantized buffers: spare capacity at most a quarter (or R tokens)
        assert st.kq.capacity <= max(st.kq.m + R, 1.25 * st.kq.m + G)
    assert t == n + 700
    np.testing.assert_array_equal(c.positions[0].tolist(), list(range(t)))
    # codes are written in place: the packed key buffer was reallocated a few times, not per append
    assert len({x.data_ptr() for x in seen}) <= 12
    # what is held: 2-bit codes + fp16 scale and zero per group (4 bits/elem at G=16), float32 residual,
    # float32 weights and int32 positions, spare capacity bounded as above
    nq = st.nk + st.nv
    need = nq * d * 4 // 8 + (2 * t - nq) * d * 4 + t * 8
    assert H * need <= c.nbytes <= H * (1.3 * need + 2 * (3 * R + 2 * G) * d * 4)
    Qt = torch.randn(H, 4, d)
    exact = bk.attention(Qt, Kt, Vt)
    err = torch.linalg.vector_norm(c.attend(Qt) - exact, dim=-1) / torch.linalg.vector_norm(exact, dim=-1)
    assert float(err.mean()) < 1.0  # 2-bit on Gaussian data: coarse, but an estimate


def test_misaligned_key_groups_repack_the_last_word():
    """group 4 at 2 bits: a key group is a quarter word; flushed blocks start inside words (both paths)."""
    H, d, R, G = 2, 8, 4, 4
    K, V, _ = make_kv("gaussian", heads=H, n=90, d=d, seed=8)
    for x, y in ((K, V), (torch.from_numpy(K), torch.from_numpy(V))):
        c = bk.compress(x[:, :10], y[:, :10], keep=1.0, method="quant", bits=2, group=G, residual=R, seed=0)
        for i in range(10, 90):
            c.append(x[:, i : i + 1], y[:, i : i + 1])
        st = c._stream.stream
        codes = np.asarray(st.kq.codes().tolist() if isinstance(x, torch.Tensor) else st.kq.codes())
        ref = bk.reference.quantization.quantize(np.asarray(K[:, : st.nk]), 2, G, -2)[0]
        np.testing.assert_array_equal(codes, ref)


# ---------------------------------------------------------------- issue 15 item 5: blocked, once per call
def test_h2o_scores_blocked_equal_unblocked():
    rng = np.random.default_rng(9)
    K = rng.normal(size=(2, 100, 8))
    Q = rng.normal(size=(4, 100, 8))
    full = rs.h2o_scores(Q, K, 0.3, group=2, block=100)
    np.testing.assert_allclose(rs.h2o_scores(Q, K, 0.3, group=2, block=7), full, rtol=1e-12)
    from balancekv.fast import selection as fs

    t = fs._colsum_torch(torch.from_numpy(Q), torch.from_numpy(K), 0.3, 2, torch.float64, block_elems=500)
    np.testing.assert_allclose(t.tolist(), full, rtol=1e-12)


def test_h2o_reference_scoring_memory_is_not_quadratic():
    """One head of 3000 tokens without queries: an n x n float64 matrix would be 72 MB."""
    n = 3000
    K = np.random.default_rng(10).normal(size=(1, n, 16))
    tracemalloc.start()
    rs.h2o_scores(K, K, block=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * n * n * 8, peak


def test_h2o_torch_scoring_blocks(monkeypatch):
    """The torch scorer never forms a block of probabilities much larger than its budget (not n x n)."""
    from balancekv.fast import selection as fs

    sizes, softmax = [], torch.softmax

    def spy(x, *a, **k):
        sizes.append(x.numel())
        return softmax(x, *a, **k)

    monkeypatch.setattr(torch, "softmax", spy)
    n = 1024
    K = torch.randn(2, n, 8)
    fs._colsum_torch(K, K, 0.3, 1, torch.float32, block_elems=1 << 15)
    assert sizes and max(sizes) <= 2 * (1 << 15) < n * n


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["h2o", "minikv"])
def test_eps_search_scores_once(method, path, monkeypatch):
    from balancekv.fast import selection as fs

    import balancekv.methods.h2o as h2o_mod

    calls = []
    if path == "numpy":
        real = rs.h2o_scores
        monkeypatch.setattr(h2o_mod.rs, "h2o_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    else:
        real = fs.h2o_scores
        monkeypatch.setattr(fs, "h2o_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    K, V, Q, Kt, Vt, Qt = _data(torch.float32, n=256)
    x, y = (K, V) if path == "numpy" else (Kt, Vt)
    c = bk.compress(x, y, eps=0.05, method=method, seed=0)
    assert len(c.diagnostics["levels"]) > 3 and len(calls) == 1
    bk.compress(x, y, eps=0.05, method=method, seed=0)  # a new call scores again (new working arrays)
    assert len(calls) == 2


# ---------------------------------------------------------------- issue 15 item 6: more probes than keys
@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "minikv"])
def test_more_queries_than_keys(method, path):
    rng = np.random.default_rng(11)
    K, V, Q = rng.normal(size=(2, 4, 16)), rng.normal(size=(2, 4, 16)), rng.normal(size=(2, 10, 16))
    if path == "torch":
        K, V, Q = (torch.from_numpy(a) for a in (K, V, Q))
    c = bk.compress(K, V, keep=0.5, method=method, queries=Q, seed=0, **({"group": 16} if method == "minikv" else {}))
    assert c.kept().tolist() == [2, 2]
    out = c.attend(Q)
    assert np.all(np.isfinite(np.asarray(out.tolist())))
    if method == "h2o":  # the last n = 4 queries score
        expect = rs.select_top(rs.h2o_scores(np.asarray(Q.tolist())[:, -4:], np.asarray(K.tolist())), 2, 1)
        np.testing.assert_array_equal(np.asarray(c.positions.tolist()), expect)


# ---------------------------------------------------------------- Triton (interpreter) and GPU
@needs_interpreter
def test_packed_decode_with_spare_capacity_triton_interpreter():
    """The split-K kernel reads packed stores with spare capacity (keys by offset, values by rows)."""
    from balancekv.fast.decode_attention import attend_parts

    K, V, Q, Kt, Vt, Qt = _data(torch.float32, n=40, d=16, H=1, q=2)
    c = bk.compress(Kt, Vt, keep=1.0, method="quant", residual=16, group=16, bits=4, seed=0)
    for i in range(20):
        c.append(Kt[:, i : i + 1], Vt[:, i : i + 1])
    parts = c.parts()
    ref = attend_parts(Qt, parts, c.scale, backend="torch")
    with triton_interpreter():
        out = attend_parts(Qt, parts, c.scale, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method", ["quant", "minikv", "balance+quant", "h2o", "snapkv"])
def test_cuda_build_matches_cpu(method):
    """On CUDA: Triton quantize+pack (bit-identical codes) and scorers, packed split-K decode attention."""
    K, V, Q, Kt, Vt, Qt = _data(torch.float32, n=512, d=64, H=4)
    opts = METHODS[method]
    cpu = bk.compress(Kt, Vt, method=method, seed=0, **opts)
    gpu = bk.compress(Kt.cuda(), Vt.cuda(), method=method, seed=0, **opts)
    assert gpu.positions.is_cuda
    if method == "quant":  # every token, bit-identical codes (Triton quantize+pack)
        torch.testing.assert_close(gpu.positions.cpu(), cpu.positions)
        for a, b in zip(_stores(cpu), _stores(gpu)):
            for x, y in zip(_quant_arrays(a), _quant_arrays(b)):
                np.testing.assert_array_equal(x, y)
    elif method != "balance+quant":  # float32 scores on another device: the same tokens up to near-ties
        for h in range(4):
            a, b = set(gpu.positions[h].tolist()), set(cpu.positions[h].tolist())
            assert len(a & b) >= 0.9 * len(b)
    for i in range(70):
        cpu.append(Kt[:, i : i + 1], Vt[:, i : i + 1])
        gpu.append(Kt[:, i : i + 1].cuda(), Vt[:, i : i + 1].cuda())
    out = gpu.attend(Qt.cuda())  # the packed split-K kernel (quantized methods), SDPA otherwise
    assert bool(torch.isfinite(out).all())
    if method == "quant":
        torch.testing.assert_close(out.cpu(), cpu.attend(Qt), rtol=2e-3, atol=2e-3)
    assert walk_bytes(gpu) <= 1.10 * gpu.nbytes


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_quant_store_triton_bit_identical():
    x = torch.randn(4, 1024, 128, generator=torch.Generator().manual_seed(0)).half()
    for axis in (-2, -1):
        ref = QuantStore.quantize(x.float().numpy(), 2, 32, axis)
        st = QuantStore.quantize(x.cuda(), 2, 32, axis, backend="triton")
        for a, b in zip(_quant_arrays(ref), _quant_arrays(st)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(st.dense().cpu().double().numpy(), ref.dense().astype(np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_torch_select_top_breaks_ties_like_the_reference(seed):
    from balancekv.fast import selection as fs

    rng = np.random.default_rng(seed)
    sc = rng.integers(0, 3, size=(3, 50)).astype(np.float64)  # many ties
    sc[0, :5] = -0.0
    for budget, recent in ((10, 3), (50, 0), (7, 7), (0, 0)):
        for dt in (torch.float64, torch.float32):
            got = fs.select_top(torch.from_numpy(sc).to(dt), budget, recent)
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.tolist(), rs.select_top(sc, budget, recent).reshape(3, budget))


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_scale_dtype_range_error_names_the_option(path):
    """Values beyond fp16 with fp16 scales: the error names the values and the option, not ``x``."""
    K, V, _ = make_kv("gaussian", heads=1, n=64, d=16, seed=12)
    V = V * 1e6
    if path == "torch":
        K, V = torch.from_numpy(K), torch.from_numpy(V)
    with pytest.raises(ValueError, match="values .*scale_dtype") as e:
        bk.compress(K, V, keep=1.0, method="quant", group=16, residual=16)
    assert "x has" not in str(e.value)
    c = bk.compress(K, V, keep=1.0, method="quant", group=16, residual=16, scale_dtype="float32")
    assert c.kept().tolist() == [64]


def test_fast_never_imports_cache_objects():
    """Layering (issue 11 item 5): kernels and their torch twins know nothing of stores, segments or caches."""
    import ast
    from pathlib import Path

    import balancekv.fast

    banned = {"quantized", "compressed", "storage", "api", "hf"}
    for path in Path(balancekv.fast.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level >= 2:  # relative to the parent package: balancekv
                    mod = "balancekv." + mod if mod else "balancekv"
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for nm in names:
                parts = set(nm.split("."))
                assert not (nm.startswith("balancekv") and parts & banned), (path.name, nm)
