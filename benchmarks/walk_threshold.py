"""Where the [ALS] walk bites: the smallest practical threshold c, and discrepancy against n (issue 13).

Part 1 (threshold). For c = k log(n/delta), delta = 0.01, and each family and size, run ``TRIALS``
independent walks (:func:`balancekv.reference.walk.self_balancing_walk_batch`, fresh uniforms) and
count those that FAIL (``|<w, u_i>| > c`` at some step). The practical factor is the smallest k on
the grid for which no family/size has more FAILs than ``delta * TRIALS`` allows (we require the
count to be at most ``floor(delta * TRIALS)``). Orthonormal vectors never FAIL (g = 0) and are
listed for completeness.

Part 2 (plot). Mean |<w_n, t>| over trials and fixed unit directions t against n (random unit
vectors in R^2), for fair coins on the same uniforms, the walk at the theorem's c = 30 log(n/delta)
and the walk at the practical c; theory lines: the theorem's bound sqrt(4 c log(2/delta)), the
coins' sqrt(2 n / (pi D)) (mean |N(0, n/D)|) and sqrt(c/pi) (mean |N(0, c/2)|, the walk's
stationary spread).

Run: ``.venv/bin/python benchmarks/walk_threshold.py`` (about 3 minutes on 2 cores); writes
``benchmarks/results/walk_threshold.json`` and ``benchmarks/results/walk_discrepancy_vs_n.png``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from balancekv.reference.walk import self_balancing_walk_batch

from balancekv.bounds.walk import als_direction_bound, als_threshold

DELTA = 0.01
TRIALS = 200
FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
OUT = Path(__file__).resolve().parent / "results"


def family(name: str, n: int, D: int, rng) -> np.ndarray:
    if name == "random":
        U = rng.normal(size=(n, D))
        return U / np.linalg.norm(U, axis=1, keepdims=True)
    if name == "identical":
        u = rng.normal(size=D)
        return np.repeat((u / np.linalg.norm(u))[None], n, axis=0)
    if name == "parallel":
        u = rng.normal(size=D)
        U = u / np.linalg.norm(u) + 0.05 * rng.normal(size=(n, D))
        return U / np.linalg.norm(U, axis=1, keepdims=True)
    if name == "orthonormal":
        return np.eye(max(n, D))[:n, :D]
    raise ValueError(name)


CONFIGS = [  # (family, D, sizes)
    ("identical", 1, (1_000, 10_000, 100_000)),
    ("random", 2, (1_000, 10_000, 100_000)),
    ("random", 16, (1_000, 10_000)),
    ("parallel", 16, (1_000, 10_000)),
    ("orthonormal", 1000, (1_000,)),
]


def threshold_table(seed: int = 0):
    rows = []
    for name, D, sizes in CONFIGS:
        for n in sizes:
            rng = np.random.default_rng([seed, n, D])
            U = family(name, n, D, rng)
            for k in FACTORS:
                c = k * math.log(n / DELTA)
                _, failed, _ = self_balancing_walk_batch(U, rng.random((TRIALS, n)), c)
                rows.append(dict(family=name, D=D, n=n, k=k, c=c, fails=int(np.count_nonzero(failed >= 0))))
                print(rows[-1], flush=True)
    allowed = int(math.floor(DELTA * TRIALS))
    ok = [k for k in FACTORS if all(r["fails"] <= allowed for r in rows if r["k"] == k)]
    # smallest k such that it and every larger k on the grid pass
    k_star = min(k for k in ok if all(kk in ok for kk in FACTORS if kk >= k))
    return rows, k_star, allowed


def discrepancy_curves(k_star: float, seed: int = 1):
    D, trials = 2, 48
    sizes = [300, 1_000, 3_000, 10_000, 30_000, 100_000]
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(4, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    out = {"n": sizes, "coins": [], "walk_theorem_c": [], "walk_practical_c": [], "bound": [], "c_theorem": []}
    for n in sizes:
        U = family("random", n, D, rng)
        r = rng.random((trials, n))
        coins = np.where(r < 0.5, 1.0, -1.0) @ U
        ct, cp = als_threshold(n, DELTA), k_star * math.log(n / DELTA)
        _, _, wt = self_balancing_walk_batch(U, r, ct)
        _, fp, wp = self_balancing_walk_batch(U, r, cp)
        for key, w in (("coins", coins), ("walk_theorem_c", wt), ("walk_practical_c", wp)):
            out[key].append(float(np.abs(w @ dirs.T).mean()))
        out["bound"].append(als_direction_bound(ct, DELTA))
        out["c_theorem"].append(ct)
        print(
            n, {k: v[-1] for k, v in out.items() if isinstance(v, list) and v}, "practical fails", int((fp >= 0).sum())
        )
    return out


def plot(curves, k_star, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array(curves["n"], float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(n, curves["coins"], "o-", label="fair coins (same uniforms)")
    ax.loglog(n, curves["walk_theorem_c"], "s-", label="walk, theorem c = 30 log(n/δ)")
    ax.loglog(n, curves["walk_practical_c"], "^-", label=f"walk, practical c = {k_star:g} log(n/δ)")
    ax.loglog(n, np.sqrt(2 * n / (np.pi * 2)), "k:", label="theory, coins: sqrt(2n/(πD))")
    ax.loglog(n, curves["bound"], "r--", label="theorem bound sqrt(4c log(2/δ)), δ=0.01")
    ax.loglog(n, np.sqrt(np.array(curves["c_theorem"]) / np.pi), "C1:", label="walk stationary: sqrt(c/π), theorem c")
    cp = k_star * np.log(n / DELTA)
    ax.loglog(n, np.sqrt(cp / np.pi), "C2:", label="walk stationary: sqrt(c/π), practical c")
    ax.set_xlabel("n (unit vectors in R^2)")
    ax.set_ylabel("mean |<w_n, t>| (48 walks x 4 directions)")
    ax.set_title("[ALS] walk: discrepancy in a fixed direction vs n")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    rows, k_star, allowed = threshold_table()
    curves = discrepancy_curves(k_star)
    plot(curves, k_star, OUT / "walk_discrepancy_vs_n.png")
    res = dict(
        delta=DELTA, trials=TRIALS, allowed_fails=allowed, factors=FACTORS, k_star=k_star, rows=rows, curves=curves
    )
    (OUT / "walk_threshold.json").write_text(json.dumps(res, indent=1))
    print(f"practical factor k* = {k_star} (c = k* log(n/delta)); {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
