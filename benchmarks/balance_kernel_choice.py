"""Evidence for the default kernel of ``method="balance"`` (SPEC 4b): a table of error ratios.

For each data source and each kernel choice, the mean relative attention error
of ``balance`` on held-out queries divided by that of ``uniform-halving`` at the
same kept size (keep 1/2, 1/4, 1/8). Below 1 means balancing helps.

Usage::

    python benchmarks/balance_kernel_choice.py                 # synthetic families
    python benchmarks/balance_kernel_choice.py --quick         # fewer seeds
    python benchmarks/balance_kernel_choice.py --defaults-only # only the shipped defaults
    python benchmarks/balance_kernel_choice.py --real          # + real captures (hook below)

Real data hook: ``--real`` calls ``balancekv.experiments.real_data.kernel_choice_sources()``
if that function exists; it must return a list of ``(name, K, V, Q)`` NumPy arrays
(``K (H, n, d)``, ``V (H, n, s)``, ``Q (H, q, d)``). ``--captures a.npz b.npz`` loads
files holding arrays ``K``, ``V``, ``Q`` directly. Choose defaults on captures that are
not the text you report results on.
"""

from __future__ import annotations

import argparse

import numpy as np
from balancekv.reference.softmax_attention import attention, relative_error

import balancekv
from balancekv.synthetic import FAMILIES, make_kv

KEEPS = (0.5, 0.25, 0.125)

#: (label, options) — the shipped default first, then the alternatives measured against it
CANDIDATES = [
    ("default", {}),
    ("published (vc=F,temp=1,a2=.025)", {"value_centering": False, "temp": 1.0, "a2": 0.025, "gamma": 4.0}),
    ("vc=T,temp=1,a2=.025", {"value_centering": True, "temp": 1.0, "a2": 0.025}),
    ("vc=T,temp=.5,a2=1", {"value_centering": True, "temp": 0.5, "a2": 1.0}),
    ("vc=F,temp=.5,a2=.025", {"value_centering": False, "temp": 0.5, "a2": 0.025}),
    ("vc=F,temp=.5,a2=1", {"value_centering": False, "temp": 0.5, "a2": 1.0}),
    ("vc=F,temp=.25,a2=.025", {"value_centering": False, "temp": 0.25, "a2": 0.025}),
    ("vc=F,temp=.5,gamma=.25", {"value_centering": False, "temp": 0.5, "gamma": 0.25}),
    ("block=256", {"block": 256}),
    ("vc=T,block=256", {"value_centering": True, "block": 256}),
]


def synthetic_sources(n: int, data_seeds) -> list[tuple[str, list]]:
    out = []
    for fam in FAMILIES:
        out.append((fam, [make_kv(fam, heads=4, n=n, d=32, q=64, seed=1000 + s) for s in data_seeds]))
    return out


def real_sources(captures=()) -> list[tuple[str, list]]:
    out = []
    for path in captures:
        z = np.load(path)
        out.append((str(path), [(z["K"], z["V"], z["Q"])]))
    try:
        from balancekv.experiments import real_data
    except ImportError as err:
        print(f"(real data unavailable: {err})")
        return out
    fn = getattr(real_data, "kernel_choice_sources", None)
    if fn is None:
        print("(balancekv.experiments.real_data has no kernel_choice_sources() yet)")
        return out
    for name, K, V, Q in fn():
        out.append((name, [(K, V, Q)]))
    return out


def mean_error(datasets, method: str, keep: float, seeds, **opts) -> float:
    errs = []
    for K, V, Q in datasets:
        exact = attention(Q, K, V)
        for seed in seeds:
            ckv = balancekv.compress(K, V, keep=keep, method=method, seed=seed, **opts)
            errs.append(float(relative_error(ckv.attend(Q), exact).mean()))
    return float(np.mean(errs))


def ratio_table(sources, candidates, seeds) -> list[dict]:
    rows = []
    for src, datasets in sources:
        base = {k: mean_error(datasets, "uniform-halving", k, seeds) for k in KEEPS}
        for label, opts in candidates:
            r = {k: mean_error(datasets, "balance", k, seeds, **opts) / base[k] for k in KEEPS}
            rows.append(
                {"source": src, "kernel": label, **{f"keep={k}": r[k] for k in KEEPS}, "uh_error_1/4": base[0.25]}
            )
            print(
                f"{src:<10} {label:<34} "
                + " ".join(f"{r[k]:>6.3f}" for k in KEEPS)
                + f"   (uniform-halving err @1/4: {base[0.25]:.3f})",
                flush=True,
            )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="2 data seeds x 2 compression seeds")
    ap.add_argument("--defaults-only", action="store_true")
    ap.add_argument("--real", action="store_true", help="add real captures via the real_data hook")
    ap.add_argument("--captures", nargs="*", default=(), help=".npz files with K, V, Q arrays")
    a = ap.parse_args(argv)
    data_seeds = range(2) if a.quick else range(4)
    seeds = range(2) if a.quick else range(3)
    sources = synthetic_sources(a.n, data_seeds)
    if a.real or a.captures:
        sources += real_sources(a.captures)
    cands = CANDIDATES[:1] if a.defaults_only else CANDIDATES
    print(f"balance error / uniform-halving error (lower is better), n={a.n}, d=32, 4 heads, 64 held-out queries")
    print(f"{'source':<10} {'kernel':<34} " + " ".join(f"{'1/' + str(int(1 / k)):>6}" for k in KEEPS))
    print(f"defaults: {balancekv.get_method('balance').defaults}")
    return ratio_table(sources, cands, seeds)


if __name__ == "__main__":
    main()
