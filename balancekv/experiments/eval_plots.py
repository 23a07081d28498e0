"""The ``balancekv eval`` figure: ΔNLL against cache bytes, and pass-key accuracy, one colour per method.

Top: teacher-forced ΔNLL (over the full cache) against the cache's bytes as a
fraction of the full fp16 cache, one line per method over the nominal keeps;
kvpress presses dashed (their bytes are their kept fraction). Points are means
over the text windows, bars ±1 standard deviation over windows. A point that is
infinite (the estimator diverged) or whose run failed is drawn as a triangle on
the top edge, not dropped. Bottom: pass-key accuracy per method with its
binomial standard error, ``correct/prompts`` written above each bar.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from balancekv.experiments import plotstyle as ps


def _series(rows, m, keeps, fallback_x):
    """``(finite points [(x, mean, sd)], marked points [(x, why)])`` of method ``m`` over ``keeps``."""
    xkey = "kept" if ps.is_kvpress(m) else "ratio"
    pts, marked = [], []
    for k in keeps:
        rs = [r for r in rows if r["method"] == m and r["keep"] == k and "note" not in r]
        good = [r for r in rs if "error" not in r and r.get("delta") is not None]
        if not good:
            if rs:
                marked.append((fallback_x.get(k, k), "failed"))
            continue
        x = float(np.mean([r[xkey] for r in good]))
        d = np.array([r["delta"] for r in good], float)
        if not np.all(np.isfinite(d)):
            marked.append((x, "inf"))
            continue
        pts.append((x, float(d.mean()), float(d.std()) if len(d) > 1 else 0.0))
    return sorted(pts), marked


def plot(nll_rows, needle_rows, keeps, info: dict, path: Path) -> None:
    """Draw the figure into ``path``. ``info``: ``model, text, windows, n_prefix, n_cont, needle_keep, lengths,
    depths`` (any missing key is left out of the titles)."""
    from matplotlib.transforms import blended_transform_factory  # noqa: PLC0415

    plt = ps.pyplot()
    from matplotlib.patches import Patch  # noqa: PLC0415

    fig = plt.figure(figsize=(ps.FIGSIZE_WIDTH, 11))
    gs = fig.add_gridspec(3, 1, height_ratios=[4.2, 1.5, 3.4], hspace=0.3, top=0.9, bottom=0.1)
    ax, lax, bx = fig.add_subplot(gs[0]), fig.add_subplot(gs[1]), fig.add_subplot(gs[2])
    lax.axis("off")

    rows = [r for r in nll_rows if r["task"] == "nll" and r["method"] not in ("full", "kvpress:full")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in methods if not ps.is_kvpress(m)] + [m for m in methods if ps.is_kvpress(m)]
    # where a failed kvpress run would have sat: the other presses' kept fraction at that keep
    fallback = {}
    for k in keeps:
        xs = [r["kept"] for r in rows if ps.is_kvpress(r["method"]) and r["keep"] == k and "kept" in r]
        fallback[k] = float(np.mean(xs)) if xs else k
    edge = blended_transform_factory(ax.transData, ax.transAxes)
    handles, any_marked, ys, xs_all = [], False, [], []
    for m in methods:
        pts, marked = _series(rows, m, keeps, fallback)
        st = ps.style(m)
        (h,) = ax.plot([], [], label=ps.label(m), **st)
        if pts:
            x, y, sd = map(np.array, zip(*pts))
            ax.errorbar(x, y, yerr=sd, capsize=3, elinewidth=1, **st)
            ys += list(y - sd) + list(y + sd)
            xs_all += list(x)
        for x, _why in marked:
            any_marked = True
            xs_all.append(x)
            ax.plot([x], [1.0], transform=edge, clip_on=False, marker="^", markersize=9, color=st["color"], ls="none")
        handles.append(h)
    ax.axhline(0.0, color="black", lw=1, zorder=0)
    lo, hi = (min(xs_all), max(xs_all)) if xs_all else (0.1, 1.0)
    ps.log2_ticks(ax, lo, hi)
    ax.set_yscale("symlog", linthresh=1e-2, linscale=0.6)
    if ys:
        ymin, ymax = min(ys), max(ys)
        ax.set_ylim(min(0.0, ymin * 1.5) if ymin < 0 else 0.0, ymax * 1.6 if ymax > 0 else 1.0)
    ax.set_xlabel("cache bytes / full fp16 cache (kvpress: kept fraction)")
    ax.set_ylabel("ΔNLL over the full cache (nats/token)")
    ax.grid(True, which="major", alpha=0.3)
    win = info.get("windows")
    cont = f"{info['n_cont']}-token continuations" if "n_cont" in info else "continuations"
    prompt = f" after {info['n_prefix']}-token prompts" if "n_prefix" in info else ""
    ax.set_title(
        f"Teacher-forced NLL: {cont}{prompt}" + (f"\n{win} text windows; bars: ±1 sd over windows" if win else ""),
        fontsize=10,
    )
    extra = [ax.plot([], [], color="black", lw=1, label="full cache (ΔNLL = 0)")[0], *ps.source_handles()]
    if any_marked:
        extra.append(ps.missing_handle("ΔNLL infinite or run failed (top edge)"))
    lax.legend(
        handles=handles + extra,
        loc="center",
        ncol=4,
        frameon=False,
        borderaxespad=0,
        handlelength=3.2,
        columnspacing=1.2,
    )

    # pass-key panel
    nm = list(dict.fromkeys(r["method"] for r in needle_rows))
    nm = [m for m in nm if not ps.is_kvpress(m)] + [m for m in nm if ps.is_kvpress(m)]
    accs, errs, counts, fails = [], [], [], []
    for m in nm:
        rs = [r for r in needle_rows if r["method"] == m and "error" not in r]
        c = [bool(r["correct"]) for r in rs]
        p = float(np.mean(c)) if c else 0.0
        accs.append(p)
        errs.append(math.sqrt(p * (1 - p) / len(c)) if c else 0.0)
        counts.append((sum(c), len(c)))
        fails.append(len([r for r in needle_rows if r["method"] == m and "error" in r]))
    pos = np.arange(len(nm))
    for i, m in enumerate(nm):
        kv = ps.is_kvpress(m)
        bx.bar(
            pos[i],
            accs[i],
            yerr=errs[i],
            capsize=3,
            color=ps.colour(m),
            edgecolor="0.2",
            hatch="//" if kv else None,
            linestyle="--" if kv else "-",
        )
        note = f"{counts[i][0]}/{counts[i][1]}" + (f"\n{fails[i]} failed" if fails[i] else "")
        bx.text(pos[i], min(accs[i] + errs[i], 1.0) + 0.03, note, ha="center", va="bottom", fontsize=9)
    bx.set_xticks(pos, [ps.label(m) for m in nm], rotation=40, ha="right", rotation_mode="anchor")
    bx.set_xlim(-0.6, len(nm) - 0.4)
    bx.set_ylim(0, 1.15)
    bx.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    bx.set_ylabel("pass-key accuracy")
    bx.grid(True, axis="y", alpha=0.3)
    n_prompts = max((c[1] for c in counts), default=0)
    desc = [f"{n_prompts} prompts per method"]
    if "lengths" in info:
        desc.append(f"lengths {', '.join(str(x) for x in info['lengths'])} tokens")
    if "depths" in info:
        desc.append(f"depths {', '.join(f'{x:g}' for x in info['depths'])}")
    keep = info.get("needle_keep")
    bal = [r["kept"] for r in needle_rows if r["method"] == "balance" and "kept" in r]
    if keep is not None:
        desc.append(f"keep {keep:g}" + (f" (realised {np.mean(bal):.2f})" if bal else ""))
    bx.set_title("Pass-key retrieval: " + "; ".join(desc) + "\nbars: binomial standard error", fontsize=10)
    bx.legend(
        handles=[
            Patch(facecolor="white", edgecolor="0.2", label="ours"),
            Patch(facecolor="white", edgecolor="0.2", hatch="//", linestyle="--", label="kvpress (hatched)"),
        ],
        loc="upper right",
        ncol=2,
        frameon=False,
    )

    model = info.get("model", "SmolLM2-135M-Instruct")
    text = f", text '{info['text']}'" if "text" in info else ""
    fig.suptitle(f"{model}{text}: generation from compressed caches", y=0.97)
    fig.savefig(path, dpi=ps.DPI, bbox_inches="tight")
    plt.close(fig)
