"""kvpress [NVIDIA/kvpress] presses on the prompts of a ``balancekv eval`` run, added to that run's results.

kvpress pins ``transformers < 5.3``, so it runs in its own virtual environment:
this script, started with balancekv's Python, reads the run folder's
``eval_prompts.json`` (the very token ids ``balancekv eval`` used) and
``eval_smollm2.json`` (BalanceKV's realised kept fractions, which every press is
given as ``compression_ratio = 1 - fraction``), starts itself again under the
kvpress Python as the worker, then stores the worker's rows in
``eval_smollm2.json`` (and raw in ``eval_kvpress_raw.json``) and rewrites
``eval_smollm2.md`` / ``.png``. The worker imports only torch, transformers and
kvpress, plus ``balancekv/experiments/eval_decode.py`` loaded by path (the same
scoring and greedy decoding as the balancekv side). kvpress's transformers (5.2) names the
forward's cache argument ``past_key_values``; ours (5.24) calls it ``cache``.

Setup and run (CPU)::

    python3.11 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0
    /tmp/kvpress-venv/bin/pip install kvpress gguf accelerate      # kvpress 0.5.5, transformers 5.2.0
    balancekv eval --out runs/eval-kv ...
    .venv/bin/python benchmarks/kvpress_eval.py runs/eval-kv --kvpress-python /tmp/kvpress-venv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

PRESSES = (
    "SnapKVPress",
    "StreamingLLMPress",
    "KnormPress",
    "ExpectedAttentionPress",
    "PyramidKVPress",
    "TOVAPress",
)
DECODE = Path(__file__).resolve().parents[1] / "balancekv" / "experiments" / "eval_decode.py"
PROMPTS, RESULTS, RAW = "eval_prompts.json", "eval_smollm2.json", "eval_kvpress_raw.json"


# ---------------------------------------------------------------------- worker (kvpress environment)
def _decode_module():
    spec = importlib.util.spec_from_file_location("balancekv_eval_decode", DECODE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(prompts_path: str, model_dir: str, gguf: str, out_path: str, fractions: str) -> None:
    """Run every press on the saved prompts; ``fractions``: JSON ``{"nll": {keep: f}, "needle": {length: f}}``."""
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    dec = _decode_module()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    prompts = json.loads(Path(prompts_path).read_text())
    frac = json.loads(fractions)
    net = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=gguf, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    ).eval()
    n = prompts["n_prefix"]
    rows = []

    def press_for(name, ratio):
        return getattr(kvpress, name)(compression_ratio=ratio)

    with torch.inference_mode():
        for s, w in enumerate(prompts["windows"]):
            cont = torch.tensor([w[n:]])
            cache = DynamicCache()
            net(torch.tensor([w[:n]]), past_key_values=cache, use_cache=True)
            pos = torch.arange(n, n + cont.shape[1])[None]
            base = dec.nll(net(cont, past_key_values=cache, use_cache=True, position_ids=pos).logits, cont)
            rows.append({"task": "nll", "sample": s, "method": "kvpress:full", "keep": 1.0, "kept": 1.0, "nll": base})
            for k, f in frac["nll"].items():
                for name in PRESSES:
                    row = {"task": "nll", "sample": s, "method": "kvpress:" + name, "keep": float(k)}
                    try:
                        cache = DynamicCache()
                        with press_for(name, 1.0 - f)(net):
                            net(torch.tensor([w[:n]]), past_key_values=cache, use_cache=True)
                        kept = cache.get_seq_length() / n
                        logits = net(cont, past_key_values=cache, use_cache=True, position_ids=pos).logits
                        value = dec.nll(logits, cont)
                        row.update(kept=kept, nll=value, delta=value - base)
                    except Exception as err:
                        row["error"] = f"{type(err).__name__}: {err}"
                    rows.append(row)
        q = torch.tensor([prompts["question"]])
        tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf, local_files_only=True)
        for nd in prompts["needles"]:
            ctx = nd["context"]
            L = len(ctx)
            f = frac["needle"][str(nd["length"])]
            for name in PRESSES:
                row = {"task": "needle", "method": "kvpress:" + name, "length": nd["length"], "depth": nd["depth"]}
                try:
                    cache = DynamicCache()
                    with press_for(name, 1.0 - f)(net):
                        net(torch.tensor([ctx]), past_key_values=cache, use_cache=True)
                    kept = cache.get_seq_length() / L
                    pos = torch.arange(L, L + q.shape[1])[None]
                    logits = net(q, past_key_values=cache, use_cache=True, position_ids=pos).logits
                    answer = tok.decode(
                        dec.greedy(
                            net, logits, cache, 8, L + q.shape[1], position_ids=True, cache_arg="past_key_values"
                        )
                    )
                    row.update(kept=kept, answer=answer, correct=nd["key"] in answer)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {err}"
                rows.append(row)
    Path(out_path).write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- orchestration (balancekv environment)
def fractions(nll_rows, needle_rows) -> dict:
    """BalanceKV's realised kept fraction per nominal keep (NLL) and per prompt length (pass key)."""
    import numpy as np

    fr_nll = {}
    for k in sorted({r["keep"] for r in nll_rows}):
        kept = [r["kept"] for r in nll_rows if r["keep"] == k and r["method"] == "balance" and "kept" in r]
        fr_nll[str(k)] = float(np.mean(kept)) if kept else float(k)
    fr_needle = {}
    for L in sorted({r["length"] for r in needle_rows}):
        kept = [r["kept"] for r in needle_rows if r["length"] == L and r["method"] == "balance"]
        fr_needle[str(L)] = float(np.mean(kept)) if kept else float(needle_rows[0]["keep"])
    return {"nll": fr_nll, "needle": fr_needle}


def run(run_dir: Path, python: str, timeout: int = 1800) -> tuple[list | None, str]:
    """Spawn the worker under ``python`` on ``run_dir``'s prompts; ``(rows, note)`` (rows None on failure)."""
    from balancekv import models

    d = json.loads((run_dir / RESULTS).read_text())
    spec = models.get_spec("smollm2")
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        str(run_dir / PROMPTS),
        str(models.model_dir("smollm2")),
        spec.weights,
        str(run_dir / RAW),
        json.dumps(fractions(d["nll"], d["needle"]), sort_keys=True),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"kvpress worker did not finish: {err}"
    if proc.returncode != 0:
        return None, f"kvpress worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    return json.loads((run_dir / RAW).read_text()), "kvpress ran in a separate environment on the same token ids"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="folder of a balancekv eval run (eval_prompts.json, eval_smollm2.json)")
    ap.add_argument("--kvpress-python", required=True, help="python of a separate venv with kvpress installed")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds the worker may take")
    args = ap.parse_args(argv)
    from balancekv.experiments.eval_report import write_report
    from balancekv.experiments.results import write_json

    rows, note = run(args.run_dir, args.kvpress_python, args.timeout)
    path = args.run_dir / RESULTS
    d = json.loads(path.read_text())
    d["kvpress"], d["kvpress_note"] = rows or [], note
    write_json(path, d)
    print(write_report(args.run_dir))
    return 0 if rows is not None else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
    else:
        sys.exit(main())
