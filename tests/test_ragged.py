"""Caches whose heads chose different levels hold each head's own slots (the ragged layout, issue 12).

Before, the dense slots of every level were packed into one array as wide as the widest head
(``storage.compact_dense``), so one exact head made every head pay for ``n`` slots. Now each level's
heads are a sub-cache of their own (:class:`balancekv.compressed.RaggedKV`): the held bytes are about
the sum of the heads' own slots, attention equals the padded layout's, appends go to every group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _memory import reachable_array_bytes

import balancekv
from balancekv import api, budget
from balancekv.compressed import RaggedKV
from balancekv.storage import compact_dense


def one_exact_head(seed=0, H=3, n=512, d=32):
    """Head 0 needs every token (random values); heads 1.. have near-constant values (any level will do)."""
    r = np.random.default_rng(seed)
    K, V = r.standard_normal((H, n, d)), r.standard_normal((H, n, d))
    V[1:] = 1.0 + 0.01 * r.standard_normal((H - 1, n, d))
    return K, V


def padded_combine(builts, choice):
    """The layout before the ragged store: every level's segments masked per head, dense ones packed into
    one segment as wide as the widest head (``compact_dense``)."""
    used = sorted(set(choice.tolist()))
    if len(used) == 1:
        return builts[used[0]].segments, builts[used[0]].stream, None
    assert all(builts[u].stream is None for u in used), "the control covers dense levels only"
    segs = [sg.masked(choice == u) for u in used for sg in builts[u].segments]
    return [compact_dense(segs, "mixed")], None, None


def compress_both(K, V, eps, monkeypatch, **kw):
    """The ragged cache and the padded control, built from the same levels (same seed)."""
    ragged = balancekv.compress(K, V, eps, seed=0, margin=1.0, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(api, "_combine", padded_combine)
        mp.setattr(budget, "uniform_if_not_dearer", lambda work, builts, choice, per_head, ok: choice)
        padded = balancekv.compress(K, V, eps, seed=0, margin=1.0, **kw)
    return ragged, padded


def slot_bytes(c) -> int:
    """Bytes of one dense slot of ``c``: key, value, log-weights (one array serves both sets of a single-set
    cache), one int32 position."""
    isz = lambda dt: balancekv._arrays.Kind.itemsize(dt)
    w = isz(c.kind.compute) if c.kind.is_torch else 8
    return c.d * isz(c.kind.dtype) + c.s * isz(c.kind.value_dtype) + (1 if c.single_set else 2) * w + 4


def as_kind(x, torch_path):
    return torch.from_numpy(x).float() if torch_path else x


def to_np(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


@pytest.mark.parametrize("torch_path", [False, True])
def test_mixed_cache_holds_its_heads_own_slots_and_attends_like_the_padded_one(torch_path, monkeypatch):
    K, V = one_exact_head()
    H, n, d = K.shape
    ragged, padded = compress_both(as_kind(K, torch_path), as_kind(V, torch_path), 0.05, monkeypatch)
    lv = ragged.diagnostics["level_per_head"]
    assert lv[0] == 0 and np.all(lv[1:] > 0)  # head 0 exact, the others compressed: a mixed cache
    np.testing.assert_array_equal(lv, padded.diagnostics["level_per_head"])
    assert isinstance(ragged, RaggedKV) and not isinstance(padded, RaggedKV)
    kept = ragged.kept()
    np.testing.assert_array_equal(kept, padded.kept())
    assert kept[0] == n and kept[1:].max() < n // 8

    # bytes: independently, the heads' own slots (kept counts x slot bytes); the padded control pays n slots per head
    expected = int(kept.sum()) * slot_bytes(ragged)
    assert ragged.nbytes <= 1.1 * expected
    assert padded.nbytes > 1.1 * expected  # the old layout fails the bound (it holds H x the widest head)
    assert padded.nbytes >= H * n * slot_bytes(padded)
    assert ragged.nbytes == reachable_array_bytes(
        ragged, stop=(ragged.diagnostics,)
    )  # nothing hidden, nothing padded held

    r = np.random.default_rng(1)
    Q = as_kind(r.standard_normal((H, 8, d)), torch_path)
    tol = dict(rtol=1e-5, atol=1e-6) if torch_path else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(ragged.attend(Q)), to_np(padded.attend(Q)), **tol)

    # appends: every head gets the new tokens; causal positions still mask per query
    for _ in range(3):
        k = as_kind(r.standard_normal((H, 2, d)), torch_path)
        v = as_kind(r.standard_normal((H, 2, d)), torch_path)
        ragged.append(k, v)
        padded.append(k, v)
    np.testing.assert_array_equal(ragged.kept(), kept + 6)
    pos = np.arange(8) + n - 1  # the first queries do not see the appended tokens
    np.testing.assert_allclose(to_np(ragged.attend(Q, positions=pos)), to_np(padded.attend(Q, positions=pos)), **tol)
    assert ragged.nbytes <= 1.1 * int(ragged.kept().sum()) * slot_bytes(ragged) + H * 16 * slot_bytes(ragged)
    assert ragged.nbytes == reachable_array_bytes(ragged, stop=(ragged.diagnostics,))

    # the dense export is the padded layout (built on demand): same estimate through a bias kernel
    Kd, Vd, bias = ragged.to_dense()
    assert tuple(Kd.shape) == (H, ragged.m, d) and ragged.m == n + 6
    a = to_np(Q) @ to_np(Kd).swapaxes(-1, -2) / np.sqrt(d) + to_np(bias)[:, None, :]
    a = np.exp(a - a.max(-1, keepdims=True))
    z = (a / a.sum(-1, keepdims=True)) @ to_np(Vd)
    np.testing.assert_allclose(z, to_np(ragged.attend(Q)), rtol=1e-4 if torch_path else 1e-9, atol=1e-6)
    pos_arr = to_np(ragged.positions)
    assert pos_arr.shape == (H, n + 6) and np.all(pos_arr[1:, int(kept[1:].max()) + 6 :] == -1)


def level_cache(K, V, method, level):
    """One level for every head (``keep`` mode builds the cache the eps search built at that level)."""
    if level is None:
        return balancekv.compress(K, V, keep=1.0, method="uniform", seed=0)
    if method == "quant":
        return balancekv.compress(K, V, keep=1.0, method="quant", seed=0, bits=level["bits"])
    return balancekv.compress(K, V, keep=level["keep"], method=method, seed=0, bits=level["bits"])


def padded_attend(c, Q):
    """The estimate over the padded export (one weighted attention over every head's padded slots)."""
    from balancekv.reference import softmax_attention as ra

    return ra.weighted_attention(Q, c.keys, c.values, c.num_logw, c.den_logw, c.scale)


@pytest.mark.parametrize("method", ["quant", "balance+quant"])
def test_mixed_quantized_cache_holds_only_its_heads_codes(method, monkeypatch):
    """Quantized levels are split per head too (their decode stream: codes, scales, residuals): the mix
    bills about the heads' own levels, not every used level for every head (the masked layout)."""
    K, V = one_exact_head()
    H, n, d = K.shape
    monkeypatch.setattr(budget, "uniform_if_not_dearer", lambda work, builts, choice, per_head, ok: choice)
    c = balancekv.compress(K, V, 0.05, method=method, seed=0, margin=1.0)
    lv = np.asarray(c.diagnostics["level_per_head"])
    used = sorted(set(lv.tolist()))
    assert len(used) > 1 and isinstance(c, RaggedKV)
    whole = {u: level_cache(K, V, method, c.diagnostics["levels"][u]).nbytes for u in used}
    own = sum(whole[u] / H * np.sum(lv == u) for u in used)  # each head at its level, billed alone
    assert c.nbytes <= 1.1 * own
    assert sum(whole.values()) > 1.1 * own  # what the masked layout held: every used level for every head
    assert c.nbytes == reachable_array_bytes(c, stop=(c.diagnostics,))
    r = np.random.default_rng(2)
    Q = r.standard_normal((H, 4, d))
    np.testing.assert_allclose(c.attend(Q), padded_attend(c, Q), rtol=1e-9, atol=1e-12)
    kept = c.kept()
    for _ in range(40):  # 160 tokens: through the residual flushes of the quantized groups
        c.append(r.standard_normal((H, 4, d)), r.standard_normal((H, 4, d)))
    np.testing.assert_array_equal(c.kept(), kept + 160)
    np.testing.assert_allclose(c.attend(Q), padded_attend(c, Q), rtol=1e-9, atol=1e-12)
    assert c.nbytes == reachable_array_bytes(c, stop=(c.diagnostics,))


def test_ragged_cache_in_leading_dims_and_attend_rows(monkeypatch):
    """Leading dims (B, H) and the decode entry point (attend_rows, rows per flattened head, GQA rows)."""
    K, V = one_exact_head(H=4)
    K, V = (
        torch.from_numpy(K).float().reshape(2, 2, *K.shape[1:]),
        torch.from_numpy(V).float().reshape(2, 2, *V.shape[1:]),
    )
    ragged, padded = compress_both(K, V, 0.05, monkeypatch)
    assert isinstance(ragged, RaggedKV) and ragged.lead == (2, 2)
    r = np.random.default_rng(3)
    Q = torch.from_numpy(r.standard_normal((2, 2, 6, K.shape[-1]))).float()
    np.testing.assert_allclose(to_np(ragged.attend(Q)), to_np(padded.attend(Q)), rtol=1e-5, atol=1e-6)
    Qr = Q.reshape(4, 6, -1)
    # query positions from the latest first slot on: every head has a visible slot for every query (a query before
    # a head's every slot has no estimate, 0/0, and raises FloatingPointError)
    first = ragged._first_position()
    qp = torch.arange(6).expand(4, 6) + first
    a = ragged.attend_rows(Qr, query_positions=qp)
    b = padded.attend_rows(Qr, query_positions=qp)
    np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        to_np(ragged.attend_rows(Qr, query_positions=torch.arange(6) + first)), to_np(b), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(FloatingPointError, match="no slot"):  # before some head's every slot
        ragged.attend_rows(Qr, query_positions=torch.arange(6) + first - 6)
