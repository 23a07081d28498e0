"""Check the issue's fig1 targets against a results JSON written by ``balancekv reproduce fig1``.

Prints three tables (markdown):
1. ``balance`` / ``uniform-halving`` error per layer and rate, with the mean over layers
   (targets: mean <= 0.8 at every rate, every layer <= 0.9);
2. per layer and SnapKV rate, the best balancekv method's error among configurations that use at
   most SnapKV's bytes, divided by SnapKV's error (target: < 1 everywhere);
3. at <= 12.5% of the fp16 bytes of the compressed *middle* (the exact first/last 256 tokens are a
   quarter of the whole cache by themselves, so whole-cache bytes never reach 12.5%): the best error
   of balance+quant, minikv, quant and snapkv among their configurations within that budget.

Run: ``python benchmarks/fig1_targets.py [benchmarks/results/fig1_smollm2_python-docs_n2048.json]``
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

DEFAULT = Path(__file__).parent / "results" / "fig1_smollm2_python-docs_n2048.json"
OURS = ("balance", "balance+quant", "uniform-halving", "uniform", "subgen", "quant", "minikv", "balance-stream")


def ours(method: str) -> bool:
    """A balancekv method, or a ``name:options`` configuration of one (see ``fig1.parse_method_spec``)."""
    return method.split(":")[0] in OURS


def mid_ratio(r) -> float:
    """Bytes of the compressed middle over its fp16 bytes (the exact ends are ``1 - ends`` of fp16)."""
    ends = 512 / 2048  # Fig1Config defaults: n = 2048, 256 exact tokens at each end
    return (r["ratio"] - ends) / (1 - ends)


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:] or [DEFAULT])[0])
    rows = json.loads(path.read_text())["rows"]
    by = defaultdict(dict)
    for r in rows:
        if r.get("error") is not None and np.isfinite(r["error"]):
            by[(r["layer"], r["method"])][r["rate"]] = r
    layers = sorted({r["layer"] for r in rows})
    rates = sorted({r["rate"] for r in rows if r["method"] == "balance"}, reverse=True)
    rl = " | ".join(f"1/{round(1 / x)}" for x in rates)
    print(f"balance / uniform-halving ({path.name})\n\n| layer | {rl} |\n|---|" + "---:|" * len(rates))
    ratios = np.array(
        [[by[(L, "balance")][x]["error"] / by[(L, "uniform-halving")][x]["error"] for x in rates] for L in layers]
    )
    for L, row in zip(layers, ratios):
        print(f"| {L} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print("| mean | " + " | ".join(f"{v:.2f}" for v in ratios.mean(0)) + " |")
    print(
        f"\nmean <= 0.8 at every rate: {bool(np.all(ratios.mean(0) <= 0.8))}; "
        f"every layer <= 0.9: {bool(np.all(ratios <= 0.9))} (max {ratios.max():.2f})"
    )
    print(f"\nbest balancekv method within SnapKV's bytes / SnapKV\n\n| layer | {rl} |\n|---|" + "---:|" * len(rates))
    worst = 0.0
    for L in layers:
        cells = []
        for x in rates:
            snap = by[(L, "snapkv")][x]
            cands = [
                r["error"]
                for (LL, m), rs in by.items()
                if LL == L and ours(m)
                for r in rs.values()
                if r["nbytes"] <= snap["nbytes"]
            ]
            v = min(cands) / snap["error"] if cands else float("nan")
            worst = max(worst, v)
            cells.append(f"{v:.2f}")
        print(f"| {L} | " + " | ".join(cells) + " |")
    print(f"\nbeats SnapKV at every budget: {worst < 1} (worst {worst:.2f})")
    print("\nat <= 12.5% of the middle's fp16 bytes: best configuration per method (middle bytes ratio)\n")
    print("| layer | " + " | ".join(("balance+quant", "minikv", "quant", "snapkv")) + " |\n|---|---:|---:|---:|---:|")
    for L in layers:
        cells = []
        for m in ("balance+quant", "minikv", "quant", "snapkv"):
            c = [
                (r["error"], mid_ratio(r))
                for (LL, mm), rs in by.items()
                if LL == L and mm.split(":")[0] == m
                for r in rs.values()
                if mid_ratio(r) <= 0.125
            ]
            cells.append("%.4f (%.3f)" % min(c) if c else "none this small")
        print(f"| {L} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
