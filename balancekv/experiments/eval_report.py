"""``eval_smollm2.md`` and ``eval_smollm2.png`` from the ``eval_smollm2.json`` of a ``balancekv eval`` run.

No model runs here: ``balancekv eval --replot DIR`` calls :func:`write_report`
alone, and so does ``benchmarks/kvpress_eval.py`` after adding kvpress's rows to
the JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from balancekv.experiments.eval_plots import plot
from balancekv.experiments.eval_runners import KEEPS, MODEL_LABEL
from balancekv.experiments.eval_tables import bytes_table, needle_table, nll_table

RESULTS = "eval_smollm2.json"
KVPRESS_NOT_RUN = "kvpress not run (python benchmarks/kvpress_eval.py adds it to a run folder)"


def plot_info(d: dict) -> dict:
    """Titles of the figure: ``d["config"]`` when the run recorded it, else parsed from ``d["settings"]``."""
    info = {"model": MODEL_LABEL}
    cfg = d.get("config")
    if cfg:
        info.update(
            text=cfg["text"],
            windows=cfg["samples"],
            n_prefix=cfg["n_prefix"],
            n_cont=cfg["n_cont"],
            needle_keep=cfg["needle_keep"],
            lengths=cfg["lengths"],
            depths=cfg["depths"],
        )
        return info
    s = d.get("settings", "")
    for key, pat, conv in (
        ("text", r"text '([^']+)'", str),
        ("windows", r"NLL: (\d+) windows", int),
        ("n_prefix", r"prefix (\d+) \+", int),
        ("n_cont", r"continuation (\d+) tokens", int),
        ("needle_keep", r"pass key:.*keep ([0-9.]+)", float),
        ("lengths", r"lengths \[([^\]]*)\]", lambda v: [int(x) for x in v.split(",")]),
        ("depths", r"depths \[([^\]]*)\]", lambda v: [float(x) for x in v.split(",")]),
    ):
        hit = re.search(pat, s)
        if hit:
            info[key] = conv(hit.group(1))
    return info


def write_report(out_dir) -> str:
    """Write ``eval_smollm2.md`` and ``eval_smollm2.png`` beside ``eval_smollm2.json`` in ``out_dir``;
    returns the markdown.

    kvpress rows carry the NLL increase over kvpress's own full-cache run (same environment);
    older result files without it fall back to this environment's full-cache NLL of the sample.
    """
    out = Path(out_dir)
    d = json.loads((out / RESULTS).read_text())
    keeps = tuple(d.get("keeps") or KEEPS)
    nll_rows, needle_rows, byte_rows = d["nll"], d["needle"], d["bytes"]
    kv_rows = d.get("kvpress") or []
    base = {r["sample"]: r["nll"] for r in nll_rows if r["method"] == "full"}
    for r in kv_rows:
        if r["task"] == "nll" and "nll" in r and "delta" not in r:
            r["delta"] = r["nll"] - base[r["sample"]]
    kv_nll = [r for r in kv_rows if r["task"] == "nll" and r["method"] != "kvpress:full"]
    all_nll = nll_rows + kv_nll
    all_needle = needle_rows + [r for r in kv_rows if r["task"] == "needle"]
    md = [
        "# End-to-end: SmolLM2 generation",
        "",
        d["settings"],
        "",
    ]
    if d.get("command"):
        md += [f"Command: `{d['command']}`", ""]
    md += [
        "## Teacher-forced NLL increase over the full cache",
        "",
        "Cells: mean ΔNLL in nats/token (realised kept fraction of prompt tokens, bytes / fp16 cache; "
        "n/a for kvpress, whose bytes are the kept fraction). Column header = nominal keep; "
        "token-selecting methods get BalanceKV's realised fraction.",
        "",
        nll_table(all_nll, keeps),
        "",
        "## Pass-key retrieval",
        "",
        needle_table(all_needle),
        "",
        "## Equal bytes: balance+quant vs minikv",
        "",
        bytes_table(byte_rows) if byte_rows else "(not run)",
        "",
        f"kvpress: {d.get('kvpress_note') or KVPRESS_NOT_RUN}",
        "",
    ]
    errors = [r for r in kv_rows if "error" in r]
    if errors:
        md += ["kvpress errors:", ""] + [f"- {r['method']} ({r['task']}): {r['error']}" for r in errors[:12]] + [""]
    notes = sorted({r["method"] for r in nll_rows if "note" in r})
    if notes:
        md += [f"Non-finite activations (the estimator blew up, ΔNLL = inf): {', '.join(notes)}.", ""]
    text = "\n".join(md)
    (out / "eval_smollm2.md").write_text(text)
    if all_nll or all_needle:
        plot(all_nll, all_needle, keeps, plot_info(d), out / "eval_smollm2.png")
    return text
