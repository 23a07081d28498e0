"""Evidence for the default options of ``balance`` *without* queries (issue 12, item 5).

Setting: the practical blocked BalanceKV of SPEC 4b
(:func:`balancekv.reference.blocked_balance.blocked_balance`, NumPy reference) with the
``keys`` kernel and no heavy hitters — what ``compress(K, V, ..., method="balance")`` runs when
no ``queries`` are given. Each candidate is compared with ``uniform-halving`` (the same procedure
with fair coins, ``gamma = 0``, same ``block``/``sink``/``window``/``halving``) at equal kept tokens
(both keep exactly ``sink + window + halving_sizes(...)[-1]`` tokens).

Error: mean over held-out queries of ``||z(q) - Attn(q)|| / ||Attn(q)||``. Held-out queries are
queries the method never saw: for the synthetic families of :func:`balancekv.synthetic.make_kv`
the family's own queries (the compressor sees only ``K``, ``V``); for SmolLM2 the queries of the
128 positions after the cache (cache = the first ``n - 128`` tokens of the TUNING text
``numpy-license``, layers 1, 2, 5, 15, 29, every query head scored against its KV head).

Tables: ``balance / uniform-halving`` error ratios (mean error of balance over data seeds x
compression seeds divided by that of uniform-halving; in brackets the min..max of the same ratio
per data seed), per family and halving rounds ``T`` (keep ``1/2^T`` of the middle), and the
log-log slope of the error against the kept tokens (T = 1..5) per family, fitted against the
total kept tokens (sink + window + middle) and against the kept middle tokens only (the 64 exact
sink/window tokens bend the first fit: it is steeper than the middle's own rate).

Usage::

    python benchmarks/balance_default_choice.py            # n=2048, 3 data seeds x 2 seeds, + SmolLM2
    python benchmarks/balance_default_choice.py --quick    # n=1024, 1 x 2 seeds, no SmolLM2, few candidates
    python benchmarks/balance_default_choice.py --no-real --plot benchmarks/results/balance_default_choice.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from balancekv.reference.blocked_balance import blocked_balance, halving_sizes
from balancekv.reference.softmax_attention import attention, relative_error, weighted_attention
from tqdm import tqdm

from balancekv.synthetic import FAMILIES, make_kv

#: the recommended default for ``balance`` without queries (issue 12 item 5); see benchmarks/README.md
RECOMMENDED = {
    "value_centering": False,
    "a2": 1.0,
    "a2_mode": "rel",
    "gamma": 64.0,
    "gamma_norm": "token",
    "temp": 0.25,
    "block": 256,
    "halving": "block",
}

#: (label, options of blocked_balance); the first is the shipped default before issue 12
CANDIDATES = [
    ("shipped (vc=F, a2=0, gamma=4, temp=1, b64)", {"value_centering": False, "a2": 0.0, "gamma": 4.0, "block": 64}),
    ("recommended", RECOMMENDED),
    ("recommended, halving=global", {**RECOMMENDED, "halving": "global"}),
    ("recommended, block=64", {**RECOMMENDED, "block": 64}),
    ("recommended, block=n (one walk)", {**RECOMMENDED, "block": 1 << 20}),
]
QUICK = (0, 1, 2)

HALVING_KEYS = ("block", "sink", "window", "halving")


def compress_error(K, V, Q, T, seed, opts, scale=None, exact=None) -> float:
    """Mean relative error on ``Q`` of blocked_balance(K, V) with ``T`` rounds and options ``opts``."""
    scale = 1.0 / np.sqrt(K.shape[-1]) if scale is None else scale
    o = {"sink": 32, "window": 32, **opts}
    idx, lw = blocked_balance(K, V, itrs=T, scale=scale, rng=np.random.default_rng(seed), **o)
    h = np.arange(K.shape[0])[:, None]
    z = weighted_attention(Q, K[h, idx], V[h, idx], lw, lw, scale)
    ex = attention(Q, K, V, scale) if exact is None else exact
    return float(relative_error(z, ex).mean())


def kept_tokens(n, T, opts) -> int:
    sink, window = opts.get("sink", 32), opts.get("window", 32)
    mid = n - min(sink, n) - min(window, n - min(sink, n))
    return n - mid + halving_sizes(mid, min(opts.get("block", 128), max(mid, 2)), T, opts.get("halving", "block"))[-1]


def uniform_opts(opts):
    return {**{k: v for k, v in opts.items() if k in HALVING_KEYS}, "gamma": 0.0}


def evaluate(datasets, opts, Ts, seeds, scale=None, desc=""):
    """``{T: (errors balance (D, S), errors uniform-halving (D, S))}`` over datasets ``(K, V, Q, exact)``."""
    out = {}
    for T in tqdm(Ts, desc=desc, leave=False):
        eb = [[compress_error(K, V, Q, T, s, opts, scale, ex) for s in seeds] for K, V, Q, ex in datasets]
        eu = [
            [compress_error(K, V, Q, T, 1000 + s, uniform_opts(opts), scale, ex) for s in seeds]
            for K, V, Q, ex in datasets
        ]
        out[T] = (np.array(eb), np.array(eu))
    return out


def ratio_cell(eb, eu) -> str:
    per = eb.mean(1) / eu.mean(1)
    return f"{eb.mean() / eu.mean():.2f} [{per.min():.2f}..{per.max():.2f}]"


def slope(ns, errs) -> float:
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def synthetic(n, Ts, dseeds, seeds, cands):
    data = {}
    for fam in FAMILIES:
        sets = []
        for ds in range(dseeds):
            K, V, Q = make_kv(fam, heads=2, n=n, d=32, q=64, seed=2000 + ds)
            sets.append((K, V, Q, attention(Q, K, V)))
        data[fam] = sets
    res = {}
    for label, opts in tqdm(cands, desc="candidates"):
        for fam in FAMILIES:
            res[label, fam] = evaluate(data[fam], opts, Ts, seeds, desc=f"{label[:20]} {fam}")
    return res


def real_sources(n=2048, future=128, layers=(1, 2, 5, 15, 29)):
    from balancekv.models import capture_layers
    from balancekv.texts import get_text

    caps = capture_layers("smollm2", get_text("numpy-license"), n, list(layers))
    out = {}
    nc = n - future
    for L, c in caps.items():
        K, V = c.keys[:, :nc], c.values[:, :nc]
        g = np.asarray(c.kv_group)
        Q = np.stack([c.queries[g == h][:, nc:].reshape(-1, K.shape[-1]) for h in range(K.shape[0])])
        out[L] = (K, V, Q, attention(Q, K, V, c.scale), c.scale)
    return out


def real(Ts, seeds, cands):
    src = real_sources()
    res = {}
    for label, opts in tqdm(cands, desc="SmolLM2 candidates"):
        for L, (K, V, Q, ex, sc) in src.items():
            res[label, L] = evaluate([(K, V, Q, ex)], opts, Ts, seeds, scale=sc, desc=f"{label[:20]} L{L}")
    return res, list(src)


def table_synth(res, cands, Ts, n):
    lines = [
        "| candidate | family | "
        + " | ".join(f"T={T} (keep 1/{2**T})" for T in Ts)
        + " | slope balance (total / middle) | slope u-h (total / middle) |",
        "|---|---|" + "---|" * len(Ts) + "---|---|",
    ]
    for label, opts in cands:
        for fam in FAMILIES:
            r = res[label, fam]
            m = [kept_tokens(n, T, opts) for T in Ts]
            mm = [x - 64 for x in m]  # middle tokens (sink + window = 64 exact)
            eb, eu = [r[T][0].mean() for T in Ts], [r[T][1].mean() for T in Ts]
            sb, su = f"{slope(m, eb):.2f} / {slope(mm, eb):.2f}", f"{slope(m, eu):.2f} / {slope(mm, eu):.2f}"
            lines.append(f"| {label} | {fam} | " + " | ".join(ratio_cell(*r[T]) for T in Ts) + f" | {sb} | {su} |")
    return lines


def table_real(res, cands, Ts, layers):
    lines = [
        "| candidate | " + " | ".join(f"T={T} mean [min..max layer]" for T in Ts) + " |",
        "|---|" + "---|" * len(Ts),
    ]
    for label, _ in cands:
        cells = []
        for T in Ts:
            rs = [res[label, L][T][0].mean() / res[label, L][T][1].mean() for L in layers]
            cells.append(f"{np.mean(rs):.2f} [{min(rs):.2f}..{max(rs):.2f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Absolute errors (balance / uniform-halving), mean over layers:", ""]
    lines += ["| candidate | " + " | ".join(f"T={T}" for T in Ts) + " |", "|---|" + "---|" * len(Ts)]
    for label, _ in cands:
        cells = [
            f"{np.mean([res[label, L][T][0].mean() for L in layers]):.3f} / "
            f"{np.mean([res[label, L][T][1].mean() for L in layers]):.3f}"
            for T in Ts
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(res, cands, Ts, n, path, real_res=None, layers=(), real_Ts=(1, 2, 3, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = list(FAMILIES) + (["SmolLM2 (mean of layers)"] if real_res else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    show = [c for c in cands if c[0] in ("recommended", cands[0][0])]
    for ax, fam in zip(axes, panels):
        for j, (label, opts) in enumerate(show):
            if fam in FAMILIES:
                r = res[label, fam]
                nn = n
            else:
                r = {
                    T: tuple(np.mean([real_res[label, L][T][i].mean() for L in layers]) for i in (0, 1))
                    for T in real_Ts
                }
                r = {T: (np.array([[r[T][0]]]), np.array([[r[T][1]]])) for T in real_Ts}
                nn = 1920
            ts = Ts if fam in FAMILIES else real_Ts
            m = [kept_tokens(nn, T, opts) for T in ts]
            ax.loglog(m, [r[T][0].mean() for T in ts], "o-", label=f"balance: {label}", color=f"C{j}")
            ax.loglog(
                m,
                [r[T][1].mean() for T in ts],
                "s--",
                label=f"uniform-halving (block {opts['block']})",
                color=f"C{j}",
                alpha=0.5,
            )
        x = np.array([kept_tokens(n, T, show[-1][1]) for T in Ts], float)
        y0 = res[show[-1][0], fam][Ts[0]][0].mean() if fam in FAMILIES else None
        if y0 is not None:
            ax.loglog(x, y0 * x[0] / x, ":", color="gray", label="1/m")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(fam)
        ax.set_xlabel("kept tokens m (sink + window + middle)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean relative error, held-out queries")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"(plot written to {path})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n=1024, 1 data seed, 3 candidates, no SmolLM2")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--data-seeds", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--no-real", action="store_true", help="skip the SmolLM2 captures")
    ap.add_argument("--plot", default=None, help="write the log-log plot to this PNG")
    ap.add_argument("--save", default=None, help="pickle the raw synthetic errors to this file")
    a = ap.parse_args(argv)
    n = a.n or (1024 if a.quick else 2048)
    dseeds = a.data_seeds or (1 if a.quick else 3)
    cands = [CANDIDATES[i] for i in QUICK] if a.quick else CANDIDATES
    Ts = (1, 2, 3, 4, 5)
    seeds = list(range(a.seeds))
    t0 = time.perf_counter()
    res = synthetic(n, Ts, dseeds, seeds, cands)
    if a.save:
        import pickle

        with open(a.save, "wb") as fh:
            pickle.dump({"n": n, "synthetic": res}, fh)
    print(
        f"\n### Synthetic families: balance / uniform-halving (n={n}, d=s=32, 2 heads, 64 held-out queries, "
        f"{dseeds} data seeds x {len(seeds)} seeds)\n"
    )
    print("\n".join(table_synth(res, cands, Ts, n)))
    real_res, layers = None, ()
    if not (a.quick or a.no_real):
        real_res, layers = real((1, 2, 3, 4), seeds, cands)
        if a.save:
            import pickle

            with open(a.save, "wb") as fh:
                pickle.dump({"n": n, "synthetic": res, "real": real_res, "layers": layers}, fh)
        print(
            "\n### SmolLM2, TUNING text numpy-license, cache 1920 tokens, future queries = next 128 positions, "
            f"layers {', '.join(map(str, layers))}: balance / uniform-halving\n"
        )
        print("\n".join(table_real(real_res, cands, (1, 2, 3, 4), layers)))
    if a.plot:
        plot(res, cands, Ts, n, a.plot, real_res, layers)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
