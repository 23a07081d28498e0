"""Decode-time compression under a memory cap: ``compress(K, V, cap=C, method=m)`` (issue 14 item 3).

The contract, for every method with a capped policy (``balancekv.methods.base.CAPPED``), on both paths:

- the cache never holds more than ``C`` tokens per head, at build and after every append, whatever the
  chunking of the appends; its bytes stay flat once it is full;
- every appended token is accounted for: the newest token is always held, every held position is a
  position of the stream, and ``n_seen`` counts every token;
- a prompt and stream that fit the cap are held exactly (the estimate is exact attention), so the cap
  only compresses when it must;
- torch float64 keeps the reference's tokens (same uniforms, same decisions).

Quality controls that must fail for the wrong policy: on a stream whose values drift, StreamingLLM
(which drops the middle) is far off and the balance / SubGen policies, which keep weighted samples of
the whole history, are not; online H2O keeps a heavy hitter only when the decode queries are fed to
:meth:`CompressedKV.observe` (the control that never observes loses it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import balancekv
from balancekv.methods import available_methods, get_method
from balancekv.methods.base import CAPPED

SCALE = 0.25


def _as(kind, x):
    if kind == "numpy":
        return np.asarray(x, np.float64)
    return torch.tensor(np.asarray(x), dtype=torch.float64 if kind == "torch64" else torch.float32)


def _stream(n: int, H: int = 2, d: int = 16, s: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((H, n, d)), rng.standard_normal((H, n, s))


def _positions(ckv) -> list[set]:
    pos = np.asarray(ckv.positions.tolist() if torch.is_tensor(ckv.positions) else ckv.positions)
    valid = np.concatenate([np.asarray(sg.valid().tolist()) for sg in ckv.segments], -1)
    return [set(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])]


def test_capped_registry_matches_the_methods():
    """``CAPPED`` names exactly the registered methods whose ``supports_cap`` is set."""
    assert sorted(CAPPED) == sorted(m for m in available_methods() if get_method(m).supports_cap)


@pytest.mark.parametrize("method", ["snapkv", "uniform", "quant", "uniform-halving", "auto"])
def test_methods_without_a_capped_policy_are_refused(method):
    K, V = _stream(40)
    with pytest.raises(ValueError, match="cap"):
        balancekv.compress(K, V, cap=16, method=method)


@pytest.mark.parametrize("bad", [0, -3])
def test_cap_must_be_a_positive_int(bad):
    K, V = _stream(40)
    with pytest.raises(ValueError, match="cap"):
        balancekv.compress(K, V, cap=bad, method="streaming")
    with pytest.raises(TypeError, match="cap"):
        balancekv.compress(K, V, cap=16.0, method="streaming")
    with pytest.raises(ValueError, match="exactly one"):
        balancekv.compress(K, V, cap=16, keep=0.5, method="streaming")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("method", CAPPED)
@pytest.mark.parametrize("n0,chunks", [(10, [1] * 90), (70, [1, 3, 7, 1, 16, 2] * 4), (200, [5] * 12)])
def test_never_more_than_the_cap_and_every_token_accounted(method, kind, n0, chunks):
    cap = 48
    total = n0 + sum(chunks)
    K, V = _stream(total, seed=n0)
    ckv = balancekv.compress(_as(kind, K[:, :n0]), _as(kind, V[:, :n0]), cap=cap, method=method, seed=1)
    assert ckv.kept().max() <= cap
    a, full_bytes, peak = n0, None, 0
    for c in chunks:
        ckv.append(_as(kind, K[:, a : a + c]), _as(kind, V[:, a : a + c]))
        a += c
        assert ckv.n_seen == a
        assert ckv.kept().max() <= cap, f"{method}: {ckv.kept().max()} tokens held after {a}"
        held = _positions(ckv)
        for h in range(K.shape[0]):
            assert a - 1 in held[h], "the newest token must be held"
            assert all(0 <= p < a for p in held[h])
        peak = max(peak, int(ckv.kept().max()))
        if full_bytes is None and a >= cap + 16:
            full_bytes = ckv.nbytes
        elif full_bytes is not None:
            # flat: a NumPy SubGen sketch's padded copy follows its widest head, within a few slots of the cap
            assert ckv.nbytes <= 1.10 * full_bytes, "memory must stay flat once the cache is full"
    # and the cap is used: the cache fills up to within one set (t = cap / 16 slots) of it, two for balance
    # (one of its sets may stay partly empty: the rest of its tokens went to the heavy hitters)
    sets = 2 if method == "balance" else 1
    assert peak >= cap - sets * (cap // 16) + 1, f"{method}: at most {peak} of {cap} slots ever used"
    z = ckv.attend(_as(kind, np.ones((2, 3, 16))))
    assert np.isfinite(np.asarray(z.tolist() if torch.is_tensor(z) else z)).all()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("method", CAPPED)
def test_a_stream_that_fits_the_cap_is_exact(method, kind):
    """Nothing is compressed while prompt + appended tokens fit: the estimate is exact attention. (60 tokens
    under a cap of 72: a capped balance stream's sets and buffer leave up to about two sets of slack — a
    set partly filled by tokens that went to the heavy hitters, and the buffer between two merges — so it
    may merge a few tokens before the cap itself is reached.)"""
    K, V = _stream(60)
    ckv = balancekv.compress(_as(kind, K[:, :20]), _as(kind, V[:, :20]), cap=72, method=method, scale=SCALE)
    for i in range(20, 60):
        ckv.append(_as(kind, K[:, i : i + 1]), _as(kind, V[:, i : i + 1]))
    Q = np.random.default_rng(5).standard_normal((2, 4, 16))
    z = ckv.attend(_as(kind, Q))
    z = np.asarray(z.tolist() if torch.is_tensor(z) else z)
    exact = balancekv.attention(Q, K, V, scale=SCALE)
    np.testing.assert_allclose(z, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("method", CAPPED)
@pytest.mark.parametrize("n,cap", [(400, 512), (300, 400)])
def test_a_prompt_under_the_cap_is_held_exactly(method, kind, n, cap):
    """``compress(..., cap=C)`` holds a prompt under the cap exactly (the compress docstring; the balance streams
    within two sets of slack, so here 100 or more tokens under it), its estimate exact attention. Control: capped
    ``balance`` compressed the prompt's middle to its sets' room, which leaves out the heavy-hitter share, so a
    400-token prompt under cap 512 was held as 369 tokens."""
    K, V = _stream(n, seed=7)
    Qp = np.random.default_rng(6).standard_normal((2, 16, 16))
    ckv = balancekv.compress(_as(kind, K), _as(kind, V), cap=cap, method=method, queries=_as(kind, Qp), scale=SCALE)
    assert ckv.kept().tolist() == [n, n], method
    Q = np.random.default_rng(5).standard_normal((2, 4, 16))
    z = ckv.attend(_as(kind, Q))
    z = np.asarray(z.tolist() if torch.is_tensor(z) else z)
    np.testing.assert_allclose(z, balancekv.attention(Q, K, V, scale=SCALE), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", CAPPED)
def test_torch_float64_keeps_the_reference_tokens(method):
    K, V = _stream(180, seed=3)
    Q0 = np.random.default_rng(9).standard_normal((2, 8, 16))
    caches = {}
    for kind in ("numpy", "torch64"):
        ckv = balancekv.compress(
            _as(kind, K[:, :100]), _as(kind, V[:, :100]), cap=40, method=method, seed=4, queries=_as(kind, Q0)
        )
        for i in range(100, 180):
            ckv.append(_as(kind, K[:, i : i + 1]), _as(kind, V[:, i : i + 1]))
            ckv.observe(_as(kind, K[:, i : i + 1]))
        caches[kind] = ckv
    assert _positions(caches["numpy"]) == _positions(caches["torch64"])
    Q = np.random.default_rng(2).standard_normal((2, 4, 16))
    zr = caches["numpy"].attend(Q)
    zt = caches["torch64"].attend(torch.tensor(Q)).numpy()
    np.testing.assert_allclose(zt, zr, rtol=1e-8, atol=1e-10)


def _drifting_stream(n: int, H: int = 2, d: int = 16, s: int = 8, seed: int = 0):
    """Small keys (attention nearly uniform over the whole stream) and values whose mean drifts with the
    position: the exact output is about the mean over the *whole* history."""
    rng = np.random.default_rng(seed)
    K = 0.3 * rng.standard_normal((H, n, d))
    drift = np.linspace(0.0, 6.0, n)[None, :, None] * np.ones((H, 1, s))
    V = drift + 0.5 * rng.standard_normal((H, n, s))
    return K, V


def _rel_err(ckv, Q, K, V, kind):
    z = ckv.attend(_as(kind, Q))
    z = np.asarray(z.tolist() if torch.is_tensor(z) else z)
    ex = balancekv.attention(Q, K, V, scale=SCALE)
    return float(np.mean(np.linalg.norm(z - ex, axis=-1) / np.linalg.norm(ex, axis=-1)))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_history_keeping_policies_beat_streamingllm_on_a_drifting_stream(kind):
    """Control: StreamingLLM (sink + recent ring) sees only the last values, far from the mean of the whole
    history, so its error is large; balance, balance-stream and subgen keep weighted samples of all of it."""
    n0, n = 64, 1024
    K, V = _drifting_stream(n)
    Q = 0.3 * np.random.default_rng(7).standard_normal((2, 16, 16))
    errs = {}
    for method in ("streaming", "balance", "balance-stream", "subgen"):
        # seeded: a drawn seed made this test random (it failed once in a full run); seeds 0-29 all pass (torch)
        ckv = balancekv.compress(
            _as(kind, K[:, :n0]), _as(kind, V[:, :n0]), cap=128, method=method, scale=SCALE, seed=0
        )
        for a in range(n0, n, 8):
            ckv.append(_as(kind, K[:, a : a + 8]), _as(kind, V[:, a : a + 8]))
        errs[method] = _rel_err(ckv, Q, K, V, kind)
    assert errs["streaming"] > 0.6, errs  # the control breaks the bound the others meet
    for method in ("balance", "balance-stream", "subgen"):
        assert errs[method] < 0.5 * errs["streaming"], errs
        assert errs[method] < 0.4, errs
    # the weighted samples must carry their weights: balance-stream without the doubling of a halved set's
    # weights measured 0.25 here (0.05 with it); balance's exact heavy hitters (never observed here) mask it
    for method in ("balance-stream", "subgen"):
        assert errs[method] < 0.15, errs


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_online_h2o_keeps_the_heavy_hitter_only_when_it_observes(kind):
    """Token 20, a decode token, has a key aligned with every decode query (it takes most of their
    attention). Fed the decode queries, online H2O accumulates its attention and keeps it; the control
    that never observes evicts it once it leaves the recent window, and its estimate is then far off."""
    H, d, s, n = 1, 16, 8, 300
    rng = np.random.default_rng(0)
    K = 0.1 * rng.standard_normal((H, n, d))
    V = rng.standard_normal((H, n, s))
    u = np.zeros(d)
    u[0] = 1.0
    K[:, 20] = 8.0 * u
    V[:, 20] = 5.0
    Qd = np.broadcast_to(u, (H, 1, d))
    results = {}
    for observe in (True, False):
        ckv = balancekv.compress(
            _as(kind, K[:, :16]), _as(kind, V[:, :16]), cap=32, method="h2o", queries=_as(kind, -Qd), scale=1.0
        )
        for i in range(16, n):
            ckv.append(_as(kind, K[:, i : i + 1]), _as(kind, V[:, i : i + 1]))
            if observe:
                ckv.observe(_as(kind, Qd))
        z = ckv.attend(_as(kind, Qd))
        z = np.asarray(z.tolist() if torch.is_tensor(z) else z)
        ex = balancekv.attention(Qd, K, V, scale=1.0)
        results[observe] = (20 in _positions(ckv)[0], float(np.linalg.norm(z - ex) / np.linalg.norm(ex)))
    assert results[True][0] and results[True][1] < 0.15, results
    assert not results[False][0] and results[False][1] > 0.3, results


@pytest.mark.parametrize("cap", [64, 96, 128, 256, 512, 1024])
def test_capped_balance_layout_fits_the_cap_with_its_window_and_sets(cap):
    """balance's capped layout (``cap_layout(..., t_div=8, min_sets=3)``, the defaults): the window is at
    least ``cap_window_min`` tokens where the cap has room for it, the sets are at most ``cap_t`` and an eighth
    of the cap, at least 3 sets fit besides the buffer's block, and everything fits the cap. Control: the
    balance-stream layout at cap 128 (t = cap / 16, one set minimum) has a 32-token window, under 64."""
    from balancekv.methods.balance_stream import cap_layout

    o = get_method("balance").defaults
    sink, window, heavy, t = cap_layout(
        cap, o["cap_sink"], o["cap_t"], o["cap_window"], o["cap_heavy"], o["cap_window_min"], 8, 3
    )
    assert t <= min(o["cap_t"], cap // 8)
    sets = (cap - sink - window - heavy - t + 1) // t  # JointBalanceStream.max_sets
    assert sets >= 3, (sink, window, heavy, t)
    assert sink + window + heavy + (sets + 1) * t <= cap + 1
    if cap >= 128:
        assert window >= o["cap_window_min"]
    c = balancekv.compress(*(np.random.default_rng(cap).standard_normal((1, 2 * cap, 8)) for _ in range(2)), cap=cap)
    assert int(c.kept().max()) <= cap
    assert cap_layout(128, 4, 64, 0.25)[1] < 64
