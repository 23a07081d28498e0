"""SubGen against uniform sampling (and BalanceKV when available) at equal memory.

Equal memory means equal bytes: for each target kept fraction ``keep`` the budget is
the ``nbytes`` of ``uniform`` at that ``keep``; SubGen's ``keep`` is lowered until its
``nbytes`` **plus its cluster centres** (``m * d`` fp16 numbers and an int32 count per
cluster, state the stream needs and ``nbytes`` does not bill) fits the budget. BalanceKV
(``balance``, power-of-two fractions only) is run at the same ``keep`` and its bytes
shown. Error: mean over the family's queries of ``||z(q) - Attn(q)|| / ||Attn(q)||``,
averaged over seeds.

    .venv/bin/python benchmarks/subgen_vs_sampling.py [--n 1024] [--heads 4] [--d 32] [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from balancekv.reference.softmax_attention import attention, relative_error

import balancekv
from balancekv.methods import available_methods
from balancekv.synthetic import make_kv


def centre_bytes(c, d: int) -> int:
    return int(sum(c.diagnostics["level_info"][0]["clusters"])) * (2 * d + 4)


def subgen_at_bytes(K, V, budget, keep, variant, seed, d):
    k = keep
    for _ in range(60):
        c = balancekv.compress(K, V, keep=k, method="subgen", variant=variant, seed=seed)
        total = c.nbytes + centre_bytes(c, d)
        if total <= budget:
            return c, total
        k *= 0.95
    raise RuntimeError("could not fit the budget")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--q", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", default="clustered,gaussian,llm")
    ap.add_argument("--keeps", default="0.25,0.125,0.0625")
    args = ap.parse_args(argv)
    has_balance = "balance" in available_methods()
    try:
        balancekv.methods.get_method("balance")
    except Exception:
        has_balance = False
    cols = ["family", "keep", "budget_B", "uniform", "subgen-off", "bytes", "subgen-str", "bytes"]
    if has_balance:
        cols += ["balance", "bytes"]
    print(" | ".join(f"{c:>10}" for c in cols))
    t0 = time.time()
    for fam in args.families.split(","):
        for keep in (float(x) for x in args.keeps.split(",")):
            acc = {k: [] for k in ("u", "so", "ss", "b", "bo", "bs", "bb", "budget")}
            for seed in range(args.seeds):
                K, V, Q = make_kv(fam, heads=args.heads, n=args.n, d=args.d, q=args.q, seed=seed)
                exact = attention(Q, K, V)
                err = lambda c, Q=Q, exact=exact: float(relative_error(c.attend(Q), exact).mean())
                u = balancekv.compress(K, V, keep=keep, method="uniform", seed=seed)
                budget = u.nbytes
                so, bo = subgen_at_bytes(K, V, budget, keep, "offline", seed, args.d)
                ss, bs = subgen_at_bytes(K, V, budget, keep, "stream", seed, args.d)
                acc["u"].append(err(u))
                acc["so"].append(err(so))
                acc["ss"].append(err(ss))
                acc["bo"].append(bo)
                acc["bs"].append(bs)
                acc["budget"].append(budget)
                if has_balance:
                    b = balancekv.compress(K, V, keep=keep, method="balance", seed=seed)
                    acc["b"].append(err(b))
                    acc["bb"].append(b.nbytes)
            row = [
                fam,
                f"{keep:.4g}",
                f"{np.mean(acc['budget']):.0f}",
                f"{np.mean(acc['u']):.4f}",
                f"{np.mean(acc['so']):.4f}",
                f"{np.mean(acc['bo']):.0f}",
                f"{np.mean(acc['ss']):.4f}",
                f"{np.mean(acc['bs']):.0f}",
            ]
            if has_balance:
                row += [f"{np.mean(acc['b']):.4f}", f"{np.mean(acc['bb']):.0f}"]
            print(" | ".join(f"{c:>10}" for c in row), flush=True)
    print(
        f"# n={args.n} heads={args.heads} d=s={args.d} queries={args.q} seeds={args.seeds}; "
        f"errors: mean relative attention error on the family's queries; bytes: nbytes (+ centres for subgen); "
        f"{time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
