"""Error versus bytes for quantization, selection and their combinations on synthetic caches.

Methods (SPEC sections 6-8): ``quant`` at 8/4/2 bits (KIVI layout, G=32, R=128),
``snapkv``, ``h2o``, ``minikv`` (H2O selection + 2-bit, G=16), ``balance`` and
``balance+quant`` (BalanceKV's kept tokens at 4 or 2 bits), ``uniform`` for scale.

Error: mean over held-out queries and heads of ``||z(q) - Attn(q)|| / ||Attn(q)||``
(queries from the family's own query distribution, never shown to the methods,
which score with their default probes: the last 64 keys). Bytes: the cache's
honest ``nbytes`` divided by the fp16 input cache (``ratio``).

Run:  .venv/bin/python benchmarks/quant_error_vs_bytes.py [--n 1024] [--d 64] [--heads 4]
"""

from __future__ import annotations

import argparse
import time

from balancekv.reference import relative_error

import balancekv as bk
from balancekv.synthetic import FAMILIES, make_kv

CONFIGS = [
    ("quant 8-bit", "quant", {"keep": 1.0, "bits": 8}),
    ("quant 4-bit", "quant", {"keep": 1.0, "bits": 4}),
    ("quant 2-bit", "quant", {"keep": 1.0, "bits": 2}),
    ("uniform 1/4", "uniform", {"keep": 0.25}),
    ("h2o 1/4", "h2o", {"keep": 0.25}),
    ("snapkv 1/4", "snapkv", {"keep": 0.25}),
    ("snapkv 1/8", "snapkv", {"keep": 0.125}),
    ("minikv 1/2 2-bit", "minikv", {"keep": 0.5}),
    ("minikv 1/4 2-bit", "minikv", {"keep": 0.25}),
    ("minikv 1/2 4-bit", "minikv", {"keep": 0.5, "bits": 4}),
    ("balance 1/4", "balance", {"keep": 0.25}),
    ("balance+quant 1/2 4-bit", "balance+quant", {"keep": 0.5, "bits": 4}),
    ("balance+quant 1/4 4-bit", "balance+quant", {"keep": 0.25, "bits": 4}),
    ("balance+quant 1/2 2-bit", "balance+quant", {"keep": 0.5, "bits": 2}),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args(argv)
    print(f"n={args.n} d={args.d} heads={args.heads} held-out queries={args.queries} seed={args.seed}")
    print("ratio = nbytes / fp16 cache; err = mean relative attention error on held-out queries")
    for fam in args.families:
        K, V, Q = make_kv(fam, heads=args.heads, n=args.n, d=args.d, q=args.queries, seed=args.seed)
        exact = bk.attention(Q, K, V)
        print(f"\nfamily={fam}")
        print(f"{'method':<26}{'ratio':>8}{'err':>10}{'kept':>7}{'sec':>7}")
        for label, method, kw in CONFIGS:
            t0 = time.perf_counter()
            c = bk.compress(K, V, method=method, seed=args.seed, **kw)
            err = float(relative_error(c.attend(Q), exact).mean())
            print(f"{label:<26}{c.ratio:>8.4f}{err:>10.4f}{int(c.kept().max()):>7}{time.perf_counter() - t0:>7.2f}")


if __name__ == "__main__":
    main()
