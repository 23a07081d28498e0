"""pytest-benchmark: fast paths vs the NumPy reference on CPU (``make bench``).

The side-by-side table with the speed-up ratio is written by ``run_benchmarks.py``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

rb = importlib.import_module("balancekv.reference.blocked_balance")
fb = importlib.import_module("balancekv.fast.blocked_balance")
rq = importlib.import_module("balancekv.reference.quantization")
fq = importlib.import_module("balancekv.fast.quantization")

H, N, D = 8, 8192, 64
KW = dict(itrs=2, block=128, sink=32, window=32, scale=D**-0.5)


@pytest.fixture(scope="module")
def kv():
    rng = np.random.default_rng(0)
    return rng.normal(size=(H, N, D)), rng.normal(size=(H, N, D))


@pytest.mark.parametrize("impl", ["reference", "torch64", "torch32"])
def test_bench_balance(benchmark, kv, impl):
    K, V = kv
    if impl == "reference":
        fn = lambda: rb.blocked_balance(K, V, rng=np.random.default_rng(1), **KW)
    else:
        dt = torch.float64 if impl == "torch64" else torch.float32
        Kt, Vt = torch.from_numpy(K).to(dt), torch.from_numpy(V).to(dt)
        fn = lambda: fb.blocked_balance(Kt, Vt, rng=np.random.default_rng(1), backend="torch", **KW)
    benchmark.pedantic(fn, rounds=2, iterations=1)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_bench_quantize_pack_keys(benchmark, kv, impl):
    x = kv[0].astype(np.float32)
    if impl == "reference":
        fn = lambda: rq.pack(rq.quantize(x, 2, 32, -2)[0], 2, -2)
    else:
        xt = torch.from_numpy(x)
        fn = lambda: fq.quantize_pack(xt, 2, 32, -2, backend="torch")
    benchmark.pedantic(fn, rounds=3, iterations=1)
