"""Property-based fuzzing of the public entry points (the reliability contract).

Hypothesis draws a method, an input kind (NumPy float32/float64, torch float16/bfloat16/float32/
float64), a layout (contiguous, non-contiguous, stride 0, read-only), sizes (n = 1.., d = 1,
extra leading dims), norms (1e-3 .. 1e4, identical keys, zero values), a mode (keep, eps, theorem
where the method has one) and appends, and checks the contract on every draw:

- the result is finite, or the call raises a ``ValueError``/``TypeError`` (never another
  exception, never NaN or inf);
- the caller's arrays are unchanged;
- every appended token is accounted for (``n_seen``; methods without a decode policy keep it);
- ``nbytes`` is honest: an independent walk of the cache finds at most 1.10x of it;
- the same seed gives the same cache;
- a compressed result never holds more than the exact cache of the same input.

Profiles (``tests/conftest.py``): ``ci`` (the default: derandomized, bounded to a few minutes on 2
cores) and ``nightly`` (``HYPOTHESIS_PROFILE=nightly``, many more examples).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _memory import reachable_array_bytes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import balancekv
from balancekv.methods import available_methods, get_method

METHODS = available_methods()
KINDS = ["np32", "np64", "t16", "tbf16", "t32", "t64"]
LAYOUTS = ["contiguous", "transposed", "stride0", "readonly"]


def method_options(method, d):
    o = {}
    if method in ("quant", "minikv", "balance+quant"):
        o["group"] = 1 if d < 2 else 2
        o["residual"] = 4
    if method in ("balance", "uniform-halving", "balance+quant"):
        o.update(block=8, sink=2, window=2)
    return o


def as_kind(x: np.ndarray, kind: str, layout: str):
    """``x`` in the drawn kind and layout; returns the array handed over and a copy to compare with."""
    if kind.startswith("np"):
        a = x.astype(np.float32 if kind == "np32" else np.float64)
        if layout == "transposed":
            a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        elif layout == "stride0" and a.shape[-2] > 0:
            a = np.broadcast_to(a[..., :1, :], a.shape)
        elif layout == "readonly":
            a = a.copy()
            a.setflags(write=False)
        return a, np.array(a, copy=True)
    dt = {"t16": torch.float16, "tbf16": torch.bfloat16, "t32": torch.float32, "t64": torch.float64}[kind]
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dt)
    if layout == "transposed":
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "stride0":
        t = t[..., :1, :].expand(t.shape)
    return t, t.clone()


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return bool(torch.equal(a, b))
    return bool(np.array_equal(a, b))


def finite(x) -> bool:
    return bool(torch.isfinite(x).all()) if torch.is_tensor(x) else bool(np.isfinite(x).all())


@st.composite
def problems(draw):
    method = draw(st.sampled_from(METHODS))
    kind = draw(st.sampled_from(KINDS))
    layout = draw(st.sampled_from(LAYOUTS if kind.startswith("np") else LAYOUTS[:3]))
    lead = draw(st.sampled_from([(1,), (2,), (2, 1)]))
    n = draw(st.integers(1, 40))
    d = draw(st.sampled_from([1, 2, 8]))
    norm = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    special = draw(st.sampled_from(["none", "identical_keys", "zero_values"]))
    mode = draw(st.sampled_from(["keep", "eps", "theorem"]))
    keep = draw(st.sampled_from([0.1, 0.5, 1.0]))
    eps = draw(st.sampled_from([0.05, 0.3]))
    appends = draw(st.lists(st.integers(0, 3), max_size=2))
    seed = draw(st.integers(0, 3))
    return method, kind, layout, lead, n, d, norm, special, mode, keep, eps, appends, seed


def _arrays(lead, n, d, norm, special, seed):
    rng = np.random.default_rng(seed)
    K = rng.normal(size=lead + (n, d))
    K *= norm / np.maximum(np.linalg.norm(K, axis=-1, keepdims=True), 1e-12)
    V = rng.normal(size=lead + (n, d))
    if special == "identical_keys":
        K[...] = K[..., :1, :]
    if special == "zero_values":
        V[...] = 0.0
    return K, V


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(problems())
def test_fuzz_contract(p):
    method, kind, layout, lead, n, d, norm, special, mode, keep, eps, appends, seed = p
    meth = get_method(method)
    if mode == "theorem":
        assume(meth.has_theorem)
    if mode == "keep" and not meth.selects_tokens:
        keep = 1.0
    K0, V0 = _arrays(lead, n, d, norm, special, seed)
    if kind in ("t16",) and norm >= 1e4:
        norm = 1e3  # float16 holds at most 65504: the norm itself must be representable
        K0, V0 = _arrays(lead, n, d, norm, special, seed)
    K, K_copy = as_kind(K0, kind, layout)
    V, V_copy = as_kind(V0, kind, "contiguous")
    kw = dict(method=method, seed=seed, **method_options(method, d))
    if mode == "keep":
        kw["keep"] = keep
    else:
        kw["eps"] = eps
        if mode == "theorem":
            kw["guarantee"] = "theorem"
    try:
        c = balancekv.compress(K, V, **kw)
    except (ValueError, TypeError) as e:
        assert str(e), "errors must say what is wrong"
        assert same(K, K_copy) and same(V, V_copy)
        return
    assert same(K, K_copy) and same(V, V_copy), "the caller's arrays were modified"
    # determinism by seed
    c2 = balancekv.compress(K, V, **kw)
    assert same(c.positions, c2.positions) and same(c.num_logw, c2.num_logw)
    # never larger than the exact cache of the same input (a few bytes of stream bookkeeping aside)
    exact = balancekv.compress(K, V, keep=1.0, method="exact")
    assert c.nbytes <= 1.05 * exact.nbytes + 64 * int(np.prod(lead)), (c.nbytes, exact.nbytes)
    # a finite estimate
    rng = np.random.default_rng(seed + 7)
    Q0 = rng.normal(size=lead + (3, d))
    Q, _ = as_kind(Q0, kind, "contiguous")
    out = c.attend(Q)
    assert finite(out), "attend returned NaN or inf from finite input"
    # appends: every token accounted for
    total = n
    for t in appends:
        k, _ = as_kind(rng.normal(size=lead + (t, d)), kind, "contiguous")
        v, _ = as_kind(rng.normal(size=lead + (t, d)), kind, "contiguous")
        kept_before = c.kept()
        has_stream = c._stream is not None
        c.append(k, v)
        total += t
        assert c.n_seen == total
        if not has_stream:
            assert np.all(c.kept() == kept_before + t), "appended tokens were lost"
    assert finite(c.attend(Q))
    # nbytes honest
    assert reachable_array_bytes(c) <= 1.10 * c.nbytes + 4096


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_attention_entry_point(kind):
    """``balancekv.attention`` on the same input kinds: finite, or a named error."""
    rng = np.random.default_rng(0)
    K, _ = as_kind(rng.normal(size=(2, 5, 3)), kind, "contiguous")
    V, _ = as_kind(rng.normal(size=(2, 5, 3)), kind, "contiguous")
    Q, _ = as_kind(rng.normal(size=(2, 4, 3)), kind, "contiguous")
    assert finite(balancekv.attention(Q, K, V, causal=True))
    with pytest.raises(TypeError, match="causal"):
        balancekv.attention(Q, K, V, causal="yes")
    Q6, _ = as_kind(rng.normal(size=(2, 6, 3)), kind, "contiguous")
    with pytest.raises(ValueError, match="queries"):
        balancekv.attention(Q6, K, V, causal=True)
