"""Decode cost of the ragged layout of mixed-level caches (issue 12): one attention call per group of heads.

A cache whose heads chose different levels is held as one sub-cache per level
(:class:`balancekv.compressed.RaggedKV`). This times one decode step (append one token per head, then
attend the step's query heads through ``attend_rows``, as :mod:`balancekv.hf` does) for

- ``uniform``: every head exact (one SDPA call over one buffer: the single-level path);
- ``padded``: the layout before, every head padded to the widest (one SDPA call);
- ``ragged``: the same heads and slots, one SDPA call per group.

    python benchmarks/ragged_decode.py [--n 2048] [--kv-heads 3] [--group 3] [--steps 200]

CPU torch, float32; prints a markdown table (median microseconds per step) and the held bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import balancekv
from balancekv.compressed import CompressedKV, RaggedKV


def caches(n, Hkv, d, exact_heads, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, V = torch.randn(Hkv, n, d, generator=g), torch.randn(Hkv, n, d, generator=g)
    ex = np.arange(exact_heads)
    co = np.arange(exact_heads, Hkv)
    c_ex = balancekv.compress(K[ex], V[ex], keep=1.0, method="uniform", seed=seed)
    c_co = balancekv.compress(K[co], V[co], keep=keep, method="balance", seed=seed)
    common = dict(lead=(Hkv,), d=d, s=d, n_seen=n, scale=c_ex.scale, kind=c_ex.kind, method="balance")
    ragged = RaggedKV([(ex, c_ex), (co, c_co)], **common)
    padded = CompressedKV(ragged.segments, **common)  # the padded copy, held as the cache
    uniform = balancekv.compress(K, V, keep=1.0, method="uniform", seed=seed)
    return {"uniform": uniform, "padded": padded, "ragged": ragged}


def time_steps(c, G, steps, d):
    L = int(np.prod(c.lead))
    ts = []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        k, v = torch.randn(L, 1, d, generator=g), torch.randn(L, 1, d, generator=g)
        q = torch.randn(L, G, d, generator=g)
        t0 = time.perf_counter()
        c.append(k, v)
        c.attend_rows(q)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[steps // 5 :]) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--exact-heads", type=int, default=1)
    ap.add_argument("--keep", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cs = caches(a.n, a.kv_heads, a.d, a.exact_heads, a.keep)
    print(
        f"n={a.n}, {a.kv_heads} KV heads ({a.exact_heads} exact, the rest at keep {a.keep}), {a.group} query heads "
        f"per KV head, d={a.d}, float32, 1 thread, {a.steps} steps\n"
    )
    print("| layout | us per decode step (append + attend) | held / fp32 cache |")
    print("|---|---:|---:|")
    for name, c in cs.items():
        us = time_steps(c, a.group, a.steps, a.d)
        print(f"| {name} | {us:.0f} | {c.ratio:.3f} |")


if __name__ == "__main__":
    main()
