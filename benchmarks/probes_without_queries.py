"""Probe queries without observed queries (issue 12, item 2): which construction makes eps honest?

For ``compress(K, V, eps)`` without ``queries`` the empirical mode judges each level on probe
queries. A good construction makes the probe error track the error on the real future queries:
the ratio ``(error on future queries) / (probe error)`` close to 1 (above 1: eps is broken on the
future queries; far below 1: eps mode keeps far more than needed).

Protocol: SmolLM2 layers 1, 2, 5, 15, 29 of the TUNING text ``numpy-license`` (n = 2048); the
cache is the first 1920 tokens, the future queries the 128 positions after it (every query head,
scored against its KV head, attention over the cache only). 64 probes per KV head. Methods at
keep ``1/2^T`` of the middle (T = 1..4): ``balance`` (shipped options, via ``compress``),
``balance-rec`` (the issue-12 recommended no-query options, NumPy reference),
``uniform-halving``, ``uniform``. 2 compression seeds. Table cells: mean over layers of the
ratio, and [min..max] over layers.

Usage::

    python benchmarks/probes_without_queries.py          # full (about 10 minutes on 2 busy cores)
    python benchmarks/probes_without_queries.py --quick  # layers 1 and 15, T = 1..3, fewer candidates
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from balancekv.reference.blocked_balance import blocked_balance
from balancekv.reference.probes import fitted_probes
from balancekv.reference.softmax_attention import attention, relative_error, weighted_attention
from tqdm import tqdm

import balancekv

try:  # the recommended no-query options of balance (issue 12 item 5)
    from balance_default_choice import RECOMMENDED, real_sources
except ImportError:  # run from the repository root
    from benchmarks.balance_default_choice import RECOMMENDED, real_sources

L = 64


def candidates(K, rng, quick=False):
    H, n, d = K.shape
    mu = K.mean(1, keepdims=True)
    out = {"last keys (shipped)": K[:, -L:], "last keys - mean": K[:, -L:] - mu}
    idx = rng.choice(n, L, replace=False)
    out["random keys"] = K[:, idx]
    if not quick:
        out["random keys - mean"] = K[:, idx] - mu
        R = np.stack([np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(H)])
        out["rotated last keys"] = np.einsum("hij,hlj->hli", R, K[:, -L:])
    for s in (1.0, 0.5, 0.25, 0.1, 0.0) if not quick else (1.0, 0.25, 0.0):
        out[f"fitted_probes(spread={s})"] = fitted_probes(K, L, spread=s, seed=int(rng.integers(1 << 30)))
    return out


def attend_fn(method, K, V, T, seed, scale):
    if method == "balance-rec":
        idx, lw = blocked_balance(
            K, V, itrs=T, scale=scale, rng=np.random.default_rng(seed), sink=32, window=32, **RECOMMENDED
        )
        h = np.arange(K.shape[0])[:, None]
        return lambda P: weighted_attention(P, K[h, idx], V[h, idx], lw, lw, scale)
    return balancekv.compress(K, V, keep=2.0**-T, method=method, seed=seed, scale=scale).attend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--all-layers", action="store_true", help="with --quick: all five layers")
    a = ap.parse_args(argv)
    layers = (1, 15) if a.quick and not a.all_layers else (1, 2, 5, 15, 29)
    Ts = (1, 2, 3) if a.quick else (1, 2, 3, 4)
    methods = ("balance", "balance-rec", "uniform-halving", "uniform")
    t0 = time.perf_counter()
    src = real_sources(layers=layers)
    rng = np.random.default_rng(0)
    rows, names = {}, []
    for Lr in tqdm(layers, desc="layers"):
        K, V, Qf, exf, sc = src[Lr]
        P = candidates(K, rng, a.quick)
        names = list(P)
        ex = {k: attention(p, K, V, sc) for k, p in P.items()}
        for meth in tqdm(methods, desc=f"L{Lr}", leave=False):
            for T in Ts:
                for seed in range(a.seeds):
                    f = attend_fn(meth, K, V, T, seed, sc)
                    ef = relative_error(f(Qf), exf).mean()
                    for name, p in P.items():
                        rows.setdefault((name, meth, T, Lr), []).append(ef / relative_error(f(p), ex[name]).mean())
    print("\n### (error on the 128 future queries) / (probe error), SmolLM2, TUNING text numpy-license\n")
    print(f"Layers {', '.join(map(str, layers))}; mean over layers [min..max layer]; {a.seeds} seeds.\n")
    for meth in methods:
        print(f"\n`{meth}`\n")
        print("| probes | " + " | ".join(f"keep 1/{2**T}" for T in Ts) + " |")
        print("|---|" + "---|" * len(Ts))
        for name in names:
            cells = []
            for T in Ts:
                r = [np.mean(rows[name, meth, T, Lr]) for Lr in layers]
                cells.append(f"{np.mean(r):.2f} [{min(r):.2f}..{max(r):.2f}]")
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
