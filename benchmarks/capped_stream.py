"""Decode-time cost under a memory cap (issue 14 item 3): flat memory, time per token independent of length.

For each method with a capped policy, a torch float32 CPU cache of ``H`` heads x d 64 under
``cap`` tokens is fed a long stream one token at a time (as in generation); per window of
``window`` tokens the script reports the median time of one ``append`` (+ ``observe`` for online
H2O, which needs the step's query) and the bytes held. The ideal is flat in both: time and bytes
of the last window / first window = 1. Keys and values: SmolLM2-like synthetic caches
(:func:`balancekv.synthetic.make_kv`, family ``llm``).

Usage::

    python benchmarks/capped_stream.py [--n 8192] [--cap 512] [--heads 3] [--window 1024] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

import balancekv
from balancekv.methods.base import CAPPED
from balancekv.synthetic import make_kv


def run(method: str, K, V, cap: int, n0: int, window: int):
    ckv = balancekv.compress(K[:, :n0], V[:, :n0], cap=cap, method=method, seed=0)
    rows, ts = [], []
    n = K.shape[1]
    for i in tqdm(range(n0, n), desc=method, leave=False, mininterval=1.0):
        k, v = K[:, i : i + 1], V[:, i : i + 1]
        t0 = time.perf_counter()
        ckv.append(k, v)
        ckv.observe(k)  # a stand-in query (online H2O uses it; the others ignore it)
        ts.append(time.perf_counter() - t0)
        if (i + 1 - n0) % window == 0:
            rows.append((i + 1, statistics.median(ts) * 1e6, ckv.nbytes, int(ckv.kept().max())))
            ts = []
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--cap", type=int, default=512)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="n 2048, window 512")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.window = 2048, 512
    torch.set_num_threads(1)
    K, V, _ = make_kv("llm", heads=a.heads, n=a.n, d=64, seed=0)
    K, V = torch.tensor(K, dtype=torch.float32), torch.tensor(V, dtype=torch.float32)
    n0 = 64
    print(
        f"\n### One token at a time under cap={a.cap} (torch float32 CPU, 1 thread, {a.heads} heads x d 64, "
        f"prompt {n0}, stream {a.n}); per window of {a.window} tokens: median us per append, bytes held\n"
    )
    out = {m: run(m, K, V, a.cap, n0, a.window) for m in tqdm(CAPPED, desc="methods")}
    ends = [r[0] for r in next(iter(out.values()))]
    full = next(j for j, e in enumerate(ends) if e - a.window >= a.cap)  # the first window of a full cache
    head = " | ".join(f"us @{e}" for e in ends)
    print(f"| method | {head} | time last / first full window | bytes first -> last | max kept |", flush=True)
    print("|---|" + "---|" * (len(ends) + 3))
    for m, rows in out.items():
        us = [r[1] for r in rows]
        print(
            f"| {m} | " + " | ".join(f"{u:.0f}" for u in us) + f" | {us[-1] / us[full]:.2f} | "
            f"{rows[0][2]} -> {rows[-1][2]} | {max(r[3] for r in rows)} |"
        )


if __name__ == "__main__":
    main()
