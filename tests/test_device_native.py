"""Torch in, torch all the way (the device-native contract of ``compress``).

For every method and torch CPU input in float32 / float64 / bf16:

- the result stays torch on the input's device, its dense slots in the input's dtype;
- no NumPy conversion happens anywhere on the path: ``torch.Tensor.numpy`` and
  ``torch.Tensor.__array__`` raise during compress, attend and append;
- float64 torch builds keep the same token positions and weights as the NumPy reference for the
  same seed (SPEC section 11: the same uniforms give the same tokens);
- float32 builds' probe error is within 1.1x of the reference's (statistically equivalent).

Control: a tensor -> NumPy round trip (what the old pipeline did) trips the guard.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from _fast_helpers import slot_table

import balancekv
from balancekv.methods import available_methods, get_method
from balancekv.synthetic import make_kv

METHODS = available_methods()


def options(method):
    return {"group": 16} if method in ("quant", "minikv", "balance+quant") else {}


def keep_of(method):
    return 0.25 if get_method(method).selects_tokens else 1.0


@contextlib.contextmanager
def no_numpy():
    """Any conversion of a tensor to NumPy raises inside the block."""

    def refuse(*a, **k):
        raise AssertionError("a tensor was converted to NumPy on the torch path")

    saved = torch.Tensor.numpy, torch.Tensor.__array__
    torch.Tensor.numpy, torch.Tensor.__array__ = refuse, refuse
    try:
        yield
    finally:
        torch.Tensor.numpy, torch.Tensor.__array__ = saved


@pytest.fixture(scope="module")
def data():
    K, V, Q = make_kv("llm", heads=2, n=512, d=32, q=16, seed=0)
    return K, V, Q


def test_the_guard_catches_a_numpy_round_trip():
    """The control: a conversion like the old pipeline's (tensor -> NumPy -> tensor) is caught."""
    t = torch.ones(3)
    with no_numpy(), pytest.raises(AssertionError, match="NumPy"):
        np.asarray(t)
    with no_numpy(), pytest.raises(AssertionError, match="NumPy"):
        t.numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_torch_stays_torch_without_numpy(data, method, dtype):
    K, V, Q = (torch.from_numpy(x).to(dtype) for x in data)
    with no_numpy():
        c = balancekv.compress(K, V, keep=keep_of(method), method=method, queries=Q, seed=0, **options(method))
        out = c.attend(Q)
        c.append(K[:, -3:], V[:, -3:])
        out2 = c.attend(Q, positions=torch.arange(500, 516))
    assert out.dtype == dtype and out.device == K.device and out2.shape == out.shape
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(out2).all())
    for sg in c.segments:
        for x in (sg.num_logw, sg.den_logw, sg.positions):
            assert torch.is_tensor(x) and x.device == K.device
    assert c.keys.dtype == dtype
    assert c.n_seen == 515


@pytest.mark.parametrize("method", METHODS)
def test_float64_torch_build_keeps_the_reference_tokens(data, method):
    K, V, Q = data
    kw = dict(keep=keep_of(method), method=method, queries=Q, seed=3, **options(method))
    ref = balancekv.compress(K, V, **kw)
    fast = balancekv.compress(*(torch.from_numpy(x) for x in (K, V)), **{**kw, "queries": torch.from_numpy(Q)})
    # the same weighted token set per head (slot order and padding may differ between the paths)
    for h in range(K.shape[0]):
        got, want = slot_table(fast, h), slot_table(ref, h)
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(fast.attend(torch.from_numpy(Q)).tolist()), ref.attend(Q), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("method", METHODS)
def test_float32_error_within_1p1x_of_the_reference(data, method):
    K, V, Q = data
    kw = dict(keep=keep_of(method), method=method, queries=Q[:, :8], seed=5, measure=True, **options(method))
    ref = balancekv.compress(K, V, **kw).diagnostics["error"]
    f32 = balancekv.compress(
        *(torch.from_numpy(x).float() for x in (K, V)), **{**kw, "queries": torch.from_numpy(Q[:, :8]).float()}
    ).diagnostics["error"]
    assert f32 <= 1.1 * ref + 1e-6, (f32, ref)


@pytest.mark.parametrize("method", ["balance", "uniform", "snapkv"])
def test_eps_mode_on_torch(data, method):
    """The eps search (probes, errors, level choice) runs on torch too and meets eps on its probes."""
    K, V, Q = (torch.from_numpy(x).float() for x in data)
    with no_numpy():
        c = balancekv.compress(K, V, 0.2, method=method, queries=Q, seed=0)
    assert np.all(np.asarray(c.diagnostics["error_per_head"]) <= 0.2)


@pytest.mark.parametrize("method", ["uniform", "snapkv"])
def test_no_query_eps_mode_on_torch_uses_the_fitted_probes(data, method):
    """Without queries the fitted probes are built on the keys' device (the Gaussian draw on the host,
    moved once): no NumPy conversion, the same probes as the reference path up to float32 rounding,
    and the same error estimate within float32 accuracy."""
    from balancekv import budget
    from balancekv.api import no_query_probes

    K, V, _ = data
    Kt, Vt = torch.from_numpy(K).float(), torch.from_numpy(V).float()
    with no_numpy():
        P = no_query_probes(Kt, 5)
        c = balancekv.compress(Kt, Vt, 0.2, method=method, seed=5)
    assert isinstance(P, torch.Tensor) and P.device == Kt.device and P.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(P.tolist()), no_query_probes(K, 5), rtol=1e-5, atol=1e-5)
    d = c.diagnostics
    assert d["probe_kind"] == "fitted" and d["margin"] == budget.MARGIN_FITTED
    assert np.all(np.asarray(d["error_bound_per_head"]) <= 0.2)
    ref = balancekv.compress(K, V, 0.2, method=method, seed=5, measure=True).diagnostics
    np.testing.assert_allclose(np.asarray(d["error_levels"]), np.asarray(ref["error_levels"]), rtol=1e-3, atol=1e-4)
