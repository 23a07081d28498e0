"""Regression tests for the failures the fuzzing pass found (the reliability issue), one per item.

Each test reproduces the reported input; before the fix it lost tokens, returned NaN/inf,
crashed with an unrelated message, or returned a cache larger than the exact one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from balancekv.reference.softmax_attention import attention, relative_error

import balancekv


@pytest.mark.parametrize("method", ["subgen", "streaming", "uniform"])
def test_append_after_a_per_head_eps_search_keeps_every_token(method):
    """Item 1: heads at different levels (one exact): every appended token stays in the exact heads."""
    rng = np.random.default_rng(0)
    K = 0.5 * rng.normal(size=(2, 256, 32))
    V = rng.normal(size=(2, 256, 32))
    K[0] *= 6
    V[1] = 3 + 0.01 * rng.normal(size=(256, 32))
    c = balancekv.compress(K, V, 0.1, method=method, seed=0)
    k, v = rng.normal(size=(2, 3, 32)), rng.normal(size=(2, 3, 32))
    kept0 = c.kept()
    exact_heads = np.asarray(c.diagnostics["level_per_head"]) == 0
    for j in range(3):
        c.append(k[:, j : j + 1], v[:, j : j + 1])
    assert c.n_seen == 259
    assert np.all(c.kept()[exact_heads] == kept0[exact_heads] + 3)
    full_K, full_V = np.concatenate([K, k], 1), np.concatenate([V, v], 1)
    Q = full_K[:, -8:]
    err = relative_error(c.attend(Q), attention(Q, full_K, full_V)).mean(-1)
    assert np.all(err[exact_heads] < 1e-9), err  # an exact head is exact, appended tokens included


def test_mixed_precision_keeps_each_dtype():
    """Item 3: float16 keys with float32 values of 1e5 stay finite (V is not cast to K's dtype);
    appending a float32 value of 1e5 to a float16 value store is refused naming v."""
    K = torch.randn(2, 64, 8).half()
    V = torch.randn(2, 64, 8) * 1e5
    c = balancekv.compress(K, V, keep=0.5, method="uniform", seed=0)
    assert c.values.dtype == torch.float32
    out = c.attend(torch.randn(2, 3, 8).half())
    assert bool(torch.isfinite(out).all())
    c16 = balancekv.compress(K, (V / 1e4).half(), keep=0.5, method="uniform", seed=0)
    with pytest.raises(ValueError, match="v does not fit"):
        c16.append(K[:, :1], V[:, :1])
    c16.append(K[:, :1], (V[:, :1] / 1e4).half())  # fits: stored
    assert c16.n_seen == 65


@pytest.mark.parametrize("method,opts,n,d", [("balance-stream", {}, 2, 4), ("balance", {}, 64, 1)])
def test_never_larger_than_exact(method, opts, n, d):
    """Item 8: a compressed result never holds more than the exact cache (eps picks by bytes)."""
    rng = np.random.default_rng(1)
    K, V = rng.normal(size=(2, n, d)), rng.normal(size=(2, n, d))
    exact = balancekv.compress(K, V, keep=1.0, method="exact")
    for kw in ({"eps": 0.5}, {"keep": 0.5}):
        c = balancekv.compress(K, V, method=method, seed=0, **kw, **opts)
        assert c.nbytes <= exact.nbytes + 64 * 2, (kw, c.nbytes, exact.nbytes)


def test_attend_and_attention_refuse_what_they_cannot_do():
    """Item 12: named errors instead of raw broadcast errors, FloatingPointError or empty-max crashes."""
    rng = np.random.default_rng(2)
    K, V, Q = rng.normal(size=(2, 16, 4)), rng.normal(size=(2, 16, 4)), rng.normal(size=(2, 3, 4))
    c = balancekv.compress(K, V, keep=1.0, method="exact")
    with pytest.raises(ValueError, match="positions"):
        c.attend(Q, positions=np.zeros((5, 3), int))  # wrong leading dims
    with pytest.raises(ValueError, match="precedes every slot"):
        balancekv.compress(K, V, keep=0.25, method="streaming", sink=0).attend(Q, positions=np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="causal"):
        balancekv.attention(Q, K, V, causal="yes")
    with pytest.raises(ValueError, match="at most n"):
        balancekv.attention(rng.normal(size=(2, 20, 4)), K, V, causal=True)
    with pytest.raises(ValueError, match="empty leading"):
        balancekv.compress(np.zeros((0, 4, 2)), np.zeros((0, 4, 2)), keep=0.5, method="uniform")
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        balancekv.compress(K.astype(np.longdouble), V, keep=0.5, method="uniform")
    with pytest.raises(TypeError, match="byte order"):
        balancekv.compress(K.astype(">f8"), V, keep=0.5, method="uniform")
    with pytest.raises(TypeError, match="meta"):
        balancekv.compress(torch.empty(2, 4, 2, device="meta"), torch.empty(2, 4, 2, device="meta"), keep=0.5)
    with pytest.raises(TypeError, match="dense"):
        balancekv.compress(torch.eye(4)[None].to_sparse(), torch.eye(4)[None], keep=0.5)
    c.append(K[:, :0], V[:, :0])  # appending nothing is a no-op, not "nothing to compress"
    assert c.n_seen == 16


def test_hf_cache_accepts_numpy_scalars_and_refuses_early():
    """Item 11: numpy scalars as compress accepts them; 'exact' with keep < 1 refused at construction;
    a sliding-window model refused with the real reason."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, MistralConfig

    from balancekv import hf

    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=32,
    )
    cache = hf.CompressedCache(cfg, "uniform", keep=np.float32(0.5), seed=np.int64(1))
    assert cache.keep == 0.5 and cache.seed == 1
    with pytest.raises(ValueError, match="keeps every token"):
        hf.CompressedCache(cfg, "exact", keep=0.25)
    mcfg = MistralConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=32,
        sliding_window=8,
    )
    layer = hf.CompressedCache(mcfg, "uniform", keep=0.5).layers[0]
    with pytest.raises(NotImplementedError, match="sliding window of 8"):
        layer.update(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16))


@pytest.mark.parametrize("variant", ["stream", "offline"])
def test_subgen_huge_t_is_capped(variant):
    """Item 12: t=10**9 used to allocate 238 GiB; reservoirs are capped by the tokens they sample."""
    rng = np.random.default_rng(3)
    K, V = rng.normal(size=(1, 64, 4)), rng.normal(size=(1, 64, 4))
    c = balancekv.compress(K, V, keep=0.5, method="subgen", t=10**9, variant=variant, seed=0)
    assert c.nbytes < 64 * 64


@pytest.mark.parametrize("method", ["h2o", "minikv", "snapkv"])
def test_compress_under_inference_mode(method):
    """Tensors made under ``torch.inference_mode()`` have no version counter; scoring must not need one."""
    with torch.inference_mode():
        K, V = torch.randn(2, 300, 32), torch.randn(2, 300, 32)
        c = balancekv.compress(K, V, keep=0.25, method=method)
        c2 = balancekv.compress(K[:, :100], V[:, :100], cap=64, method="h2o")
        c2.append(K[:, 100:101], V[:, 100:101])
    assert c.kept().max() <= 75 and c2.kept().max() <= 64
