"""Query-scoring selections without queries: the attention sink (``sink="auto"`` against ``sink=0``).

Usage (CPU, a minute)::

    .venv/bin/python benchmarks/no_query_sinks.py [--text python-docs] [--layers 2 10 20]

Protocol: one SmolLM2 layer's cache of the first 768 tokens of ``--text``, compressed *without*
``queries`` (H2O scores with the keys themselves, SnapKV with the last keys); the error is the mean over
heads of the mean relative error ``||z - Attn|| / ||Attn||`` on the 3 x 128 real queries of the next 128
positions (each KV head's query group), against the exact attention over the 768 cached tokens. One row
per (layer, method, keep) with ``sink=0`` (the published selections) and the default ``sink="auto"`` (the
first 4 tokens kept when no queries are given; ``balancekv.methods.h2o.SINK_WITHOUT_QUERIES``).
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm.auto import tqdm

import balancekv
from balancekv import models
from balancekv.texts import get_text

N_CACHE, N_NEXT = 768, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default="python-docs")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20])
    args = ap.parse_args()
    caps = models.capture_layers("smollm2", get_text(args.text), N_CACHE + N_NEXT, args.layers)
    rows = []
    jobs = [(L, m, k) for L in args.layers for m in ("h2o", "snapkv", "minikv") for k in (0.5, 0.25)]
    for L, method, keep in tqdm(jobs, desc="builds"):
        cp = caps[L]
        Q, _ = cp.queries_by_kv_head(order="position")
        H, g = cp.keys.shape[0], Q.shape[1] // (N_CACHE + N_NEXT)
        nxt = Q.reshape(H, N_CACHE + N_NEXT, g, -1)[:, N_CACHE:].reshape(H, N_NEXT * g, -1)
        K, V = cp.keys[:, :N_CACHE], cp.values[:, :N_CACHE]
        exact = balancekv.attention(nxt, K, V, scale=cp.scale)
        err = {}
        for sink in (0, "auto"):
            c = balancekv.compress(K, V, keep=keep, method=method, scale=cp.scale, seed=0, sink=sink)
            e = np.linalg.norm(c.attend(nxt) - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
            err[sink] = e.mean(-1)
        rows.append((L, method, keep, err[0], err["auto"]))
    print(f"\ntext {args.text!r}, cache {N_CACHE} tokens, next {N_NEXT} positions, no queries given\n")
    print("| layer | method | keep | error, sink=0 (worst head) | error, sink=auto (worst head) |")
    print("|---|---|---|---|---|")
    for L, method, keep, e0, e1 in rows:
        print(f"| {L} | {method} | {keep} | {e0.mean():.3f} ({e0.max():.3f}) | {e1.mean():.3f} ({e1.max():.3f}) |")


if __name__ == "__main__":
    main()
