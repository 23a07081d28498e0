"""``method="auto"`` against every single method at equal bytes (issue 12, item 4).

Protocol (the fig1 layers, simplified as issue 12 states it): SmolLM2 layers 1, 2, 5, 15, 29 on
the first 2048 tokens of the report text ``python-docs``; the cache is the prefix of
``n = 2048 - 128`` tokens, stored in float16 (the model's cache dtype; the byte budget is a
fraction of the fp16 cache); the observed queries, given to ``compress`` as ``queries``, are the
64 positions before the cache end of the 3 query heads that read each KV head (192 per KV head,
positions ascending); the future queries are the 128 positions after the cache end. Error: the
mean over the 9 query heads and the 128 future queries of ``||a^ - a|| / ||a||``, ``a`` exact
attention over the cached prefix. Every method runs with its defaults at ``ratio=r``
(``compress(..., ratio=r)``: at most ``r`` of the fp16 cache's bytes, weights, positions and
scales included); ``auto`` chooses per KV head among the same methods by validated error on the
observed queries only.

    python benchmarks/auto_vs_methods.py                 # the table (ratios 0.125 and 0.25)
    python benchmarks/auto_vs_methods.py --folds --ratios 0.25 --methods balance snapkv h2o
                                                         # fold schemes: validated vs future error
    python benchmarks/auto_vs_methods.py --eps --methods balance balance+quant --probes observed fitted
                                                         # eps: future error vs eps (calibrated margins)
    (the eps rule's defaults were chosen with benchmarks/eps_rule_calibration.py)

Prints markdown tables; ``--out FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import balancekv
from balancekv import budget
from balancekv.auto import DEFAULT_CANDIDATES
from balancekv.models import capture_layers
from balancekv.texts import get_text

LAYERS = (1, 2, 5, 15, 29)
RATIOS = (0.125, 0.25)
N, FUTURE, OBSERVED = 2048, 128, 64


def problem(cap):
    """``(K, V, Q_obs, Q_future)`` per KV head, float16 (queries: the 3 query heads, positions ascending)."""
    n = N - FUTURE
    Hkv = cap.keys.shape[0]

    def grouped(a, b):
        Qg = np.stack([cap.queries[np.flatnonzero(cap.kv_group == h), a:b] for h in range(Hkv)])  # (Hkv, g, t, d)
        return Qg.transpose(0, 2, 1, 3).reshape(Hkv, -1, Qg.shape[-1])

    f16 = lambda x: np.ascontiguousarray(x, dtype=np.float16)
    return f16(cap.keys[:, :n]), f16(cap.values[:, :n]), f16(grouped(n - OBSERVED, n)), f16(grouped(n, N))


def future_error(c, K, V, Qf, scale):
    ex = balancekv.attention(Qf.astype(np.float64), K.astype(np.float64), V.astype(np.float64), scale=scale)
    z = c.attend(Qf.astype(np.float64))
    return float((np.linalg.norm(z - ex, axis=-1) / np.linalg.norm(ex, axis=-1)).mean())


def run_table(caps, methods, ratios, seed=0):
    rows = {}  # (layer, ratio) -> {method: (future error, ratio held, info)}
    for L, cap in caps.items():
        K, V, Qo, Qf = problem(cap)
        for r in ratios:
            cell = {}
            for m in (*methods, "auto"):
                t0 = time.time()
                try:
                    c = balancekv.compress(
                        K, V, ratio=r, method=m, queries=Qo, scale=cap.scale, seed=seed, measure=True
                    )
                except ValueError as e:
                    cell[m] = (np.nan, np.nan, "does not fit: " + str(e).split(":")[1].split("(")[0].strip())
                    continue
                info = ""
                if m == "auto":
                    info = "/".join(str(x) for x in c.diagnostics["method_per_head"].ravel())
                cell[m] = (future_error(c, K, V, Qf, cap.scale), c.ratio, info)
                print(
                    f"layer {L} ratio {r} {m}: {cell[m][0]:.4f} (held {cell[m][1]:.4f}, {time.time() - t0:.1f}s)",
                    file=sys.stderr,
                )
            rows[(L, r)] = cell
    return rows


def table_markdown(rows, methods, ratios, layers):
    out = []
    for r in ratios:
        out.append(f"\n**ratio = {r}** (error on the 128 future queries; held bytes / fp16 cache in parentheses)\n")
        out.append("| method | " + " | ".join(f"layer {L}" for L in layers) + " | mean |")
        out.append("|---" * (len(layers) + 2) + "|")
        for m in (*methods, "auto"):
            errs = [rows[(L, r)][m][0] for L in layers]
            cells = ["—" if np.isnan(e) else f"{e:.4f} ({rows[(L, r)][m][1]:.3f})" for L, e in zip(layers, errs)]
            mean = np.nan if any(np.isnan(errs)) else float(np.mean(errs))
            out.append(f"| {m} | " + " | ".join(cells) + f" | {'—' if np.isnan(mean) else f'{mean:.4f}'} |")
        best = []
        for L in layers:
            singles = {m: rows[(L, r)][m][0] for m in methods if not np.isnan(rows[(L, r)][m][0])}
            b = min(singles, key=singles.get)
            a = rows[(L, r)]["auto"][0]
            best.append(f"{b} {singles[b]:.4f}; auto/best {a / singles[b]:.2f}")
        out.append("| best single | " + " | ".join(best) + " | |")
        out.append("| auto's choice per KV head | " + " | ".join(rows[(L, r)]["auto"][2] for L in layers) + " | |")
    return "\n".join(out)


def run_folds(caps, ratios, methods=("balance", "snapkv", "h2o", "balance+quant"), seed=0):
    """Validated (cross-fitted) error on the observed queries vs the error on the future queries, per fold
    scheme, for the query-driven methods at each ratio; also the in-sample error."""
    out = ["\n| fold scheme | mean validated / future | mean in-sample / future | cells |", "|---|---|---|---|"]
    acc = {"contiguous": [], "interleaved": []}
    ins = []
    for cap in caps.values():
        K, V, Qo, Qf = problem(cap)
        for r in ratios:
            for m in methods:
                for scheme in acc:
                    budget.FOLD_SCHEME = scheme
                    c = balancekv.compress(
                        K, V, ratio=r, method=m, queries=Qo, scale=cap.scale, seed=seed, measure=True
                    )
                    fut = future_error(c, K, V, Qf, cap.scale)
                    acc[scheme].append(c.diagnostics["error"] / fut)
                    if scheme == "contiguous":
                        ins.append(c.diagnostics["error_in_sample"] / fut)
    budget.FOLD_SCHEME = "contiguous"
    for scheme, v in acc.items():
        out.append(f"| {scheme} | {np.mean(v):.3f} | {np.mean(ins):.3f} | {len(v)} |")
    return "\n".join(out)


def run_eps(
    caps, eps_list=(0.05, 0.1, 0.2), methods=("balance", "balance+quant"), seed=0, modes=("observed",), margin=None
):
    """Items 1-2's check: the error on the future queries against eps, with the observed queries
    (``observed``: cross-fitted, shift margin) and without (``fitted``: fitted probes), at the calibrated
    margins (``margin=None``) or a given one, with the held bytes."""
    from tqdm import tqdm

    out = [
        "\n| method | eps | probes (margin) | "
        + " | ".join(f"layer {L}" for L in caps)
        + " | max future / eps | mean held | mean kept |",
        "|---" * (len(caps) + 6) + "|",
    ]
    probs = {L: problem(cap) for L, cap in caps.items()}
    cells = [(mode, m, eps) for mode in modes for m in methods for eps in eps_list]
    for mode, m, eps in tqdm(cells, desc="eps cells"):
        errs, held, kept, mg = [], [], [], None
        for L, cap in caps.items():
            K, V, Qo, Qf = probs[L]
            q = Qo if mode == "observed" else None
            c = balancekv.compress(K, V, eps, method=m, queries=q, scale=cap.scale, seed=seed, margin=margin)
            errs.append(future_error(c, K, V, Qf, cap.scale))
            held.append(c.ratio)
            kept.append(float(np.sum(c.kept())) / (K.shape[0] * K.shape[1]))  # tokens kept / n, mean over heads
            mg = c.diagnostics["margin"]
        cells_md = " | ".join(f"{e:.3f} ({h:.2f})" for e, h in zip(errs, held))
        out.append(
            f"| {m} | {eps} | {mode} ({mg:g}) | {cells_md} | {max(errs) / eps:.2f} | {np.mean(held):.3f} "
            f"| {np.mean(kept):.3f} |"
        )
        tqdm.write(out[-1], file=sys.stderr)
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="*", default=list(LAYERS))
    ap.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_CANDIDATES))
    ap.add_argument("--folds", action="store_true", help="compare the fold schemes instead")
    ap.add_argument("--eps", action="store_true", help="eps mode: future-query error against eps instead")
    ap.add_argument("--text", default="python-docs", help="python-docs (report) or numpy-license (tuning)")
    ap.add_argument(
        "--probes",
        nargs="*",
        default=["observed"],
        choices=["observed", "fitted"],
        help="--eps: with the observed queries (observed) and/or without them (fitted probes)",
    )
    ap.add_argument("--margin", type=float, default=None, help="--eps: the margin (default: the calibrated one)")
    ap.add_argument("--eps-list", type=float, nargs="*", default=[0.05, 0.1, 0.2], help="--eps: the targets")
    ap.add_argument("--auto-rank", choices=["max", "gap"], default=None, help="budget.AUTO_RANK (default: package)")
    ap.add_argument(
        "--offset", type=int, default=0, help="the window starts this many characters into the text (default 0)"
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.auto_rank:
        budget.AUTO_RANK = a.auto_rank
    caps = capture_layers("smollm2", get_text(a.text)[a.offset :], N, a.layers)
    if a.folds:
        md = run_folds(caps, a.ratios, methods=tuple(a.methods))
    elif a.eps:
        md = run_eps(caps, tuple(a.eps_list), methods=tuple(a.methods), modes=tuple(a.probes), margin=a.margin)
    else:
        md = table_markdown(run_table(caps, a.methods, a.ratios), a.methods, a.ratios, a.layers)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
