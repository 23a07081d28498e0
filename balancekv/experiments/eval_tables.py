"""Markdown tables of ``balancekv eval`` results (rows from :mod:`balancekv.experiments.eval_runners`)."""

from __future__ import annotations

import numpy as np


def mean(rows, key) -> float:
    """Mean of ``key`` over the rows that have it (rows with a ``note`` only explain another row)."""
    vals = [r[key] for r in rows if r.get(key) is not None and "note" not in r]
    return float(np.mean(vals)) if vals else float("nan")


def _nll_rows(rows, m, k):
    return [
        r
        for r in rows
        if r["task"] == "nll" and r["method"] == m and r["keep"] == k and "error" not in r and "note" not in r
    ]


def nll_table(rows, keeps) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["task"] == "nll" and "error" not in r))
    head = "| method | " + " | ".join(f"ΔNLL @ {k:g} (kept, bytes)" for k in keeps) + " |"
    lines = [head, "|" + "---|" * (len(keeps) + 1)]
    for m in methods:
        cells = []
        for k in keeps:
            rs = _nll_rows(rows, m, k)
            if not rs:
                cells.append("—")
                continue
            ratio = mean(rs, "ratio")
            bytes_s = f"{ratio:.3f}" if np.isfinite(ratio) else "n/a"
            cells.append(f"{mean(rs, 'delta'):+.4f} ({mean(rs, 'kept'):.3f}, {bytes_s})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def needle_table(rows) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["task"] == "needle" and "error" not in r))
    lengths = sorted({r["length"] for r in rows if r["task"] == "needle"})
    lines = [
        "| method | " + " | ".join(f"acc @ {L} tok" for L in lengths) + " | mean acc | kept |",
        "|" + "---|" * (len(lengths) + 3),
    ]
    for m in methods:
        rs = [r for r in rows if r["task"] == "needle" and r["method"] == m and "error" not in r]
        cells = [f"{np.mean([r['correct'] for r in rs if r['length'] == L]):.2f}" for L in lengths]
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {np.mean([r['correct'] for r in rs]):.2f} | {mean(rs, 'kept'):.3f} |"
        )
    return "\n".join(lines)


def bytes_table(rows) -> str:
    lines = ["| method | config | bytes / fp16 | ΔNLL |", "|---|---|---|---|"]
    for key in dict.fromkeys((r["method"], r["config"]) for r in rows):
        rs = [r for r in rows if (r["method"], r["config"]) == key]
        lines.append(f"| {key[0]} | `{key[1]}` | {mean(rs, 'ratio'):.4f} | {mean(rs, 'delta'):+.4f} |")
    return "\n".join(lines)
