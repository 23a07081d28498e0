"""Fast H2O / SnapKV column-sum scorers against the reference (SPEC sections 7 and 11).

Contract: ``assert_close`` to the reference scores (float64 1e-10, float32 1e-4 relative);
the Triton two-pass scorer (row log-sum-exp, then normalised column sums) under the
interpreter on small grids, compiled on CUDA.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _fast_helpers import HAS_CUDA, needs_interpreter, triton_interpreter

rs = importlib.import_module("balancekv.reference.selection")
fs = importlib.import_module("balancekv.fast.selection")


def _qk(seed, B=1, Hkv=2, group=2, Lq=20, L=37, d=8, mag=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, Hkv * group, Lq, d)) * mag, rng.normal(size=(B, Hkv, L, d)) * mag


@pytest.mark.parametrize("group,Lq", [(1, 37), (2, 20), (3, 1)])
def test_h2o_torch_matches_reference(group, Lq):
    Q, K = _qk(group, group=group, Lq=Lq)
    want = rs.h2o_scores(Q, K, group=group)
    got = fs.h2o_scores(Q, K, group=group, backend="torch")
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # every causal row sums to one: the scores of a KV head sum to group * Lq
    np.testing.assert_allclose(got.sum(-1), group * Lq, rtol=1e-12)


def test_h2o_torch_float32_and_large_logits():
    Q, K = _qk(5, mag=30.0)  # logits in the thousands: needs the max shift
    want = rs.h2o_scores(Q, K, group=2)
    got = fs.h2o_scores(torch.from_numpy(Q).float(), torch.from_numpy(K).float(), group=2, backend="torch")
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_snapkv_torch_matches_reference(pool):
    Q, K = _qk(7)
    want = rs.snapkv_scores(Q, K, window=6, kernel=5, pool=pool, group=2)
    got = fs.snapkv_scores(Q, K, window=6, kernel=5, pool=pool, group=2, backend="torch")
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-10, atol=1e-12)


def test_bad_input_named():
    Q, K = _qk(1)
    with pytest.raises(ValueError, match="group"):
        fs.h2o_scores(Q, K, group=3)
    with pytest.raises(ValueError, match="kernel"):
        fs.snapkv_scores(Q, K, kernel=4, group=2)
    with pytest.raises(ValueError, match="pool"):
        fs.snapkv_scores(Q, K, pool="median", group=2)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_h2o_triton_two_pass_interpreter(dtype):
    Q, K = _qk(11, Lq=20, L=37)
    want = rs.h2o_scores(Q, K, group=2)
    with triton_interpreter():
        got = fs.h2o_scores(torch.from_numpy(Q).to(dtype), torch.from_numpy(K).to(dtype), group=2, backend="triton")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.double().numpy(), want, **tol)


@needs_interpreter
def test_snapkv_triton_interpreter():
    Q, K = _qk(12)
    want = rs.snapkv_scores(Q, K, window=8, kernel=7, pool="max", group=2)
    with triton_interpreter():
        got = fs.snapkv_scores(
            torch.from_numpy(Q), torch.from_numpy(K), window=8, kernel=7, group=2, backend="triton"
        ).numpy()
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_h2o_triton_gpu_real_tiles():
    Q, K = _qk(0, Hkv=4, group=4, Lq=1000, L=1000, d=64)
    want = rs.h2o_scores(Q, K, group=4)
    got = fs.h2o_scores(
        torch.from_numpy(Q).float().cuda(), torch.from_numpy(K).float().cuda(), group=4, backend="triton"
    )
    np.testing.assert_allclose(got.double().cpu().numpy(), want, rtol=1e-4, atol=1e-5)
