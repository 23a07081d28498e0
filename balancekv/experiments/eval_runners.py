"""The tasks of ``balancekv eval`` on SmolLM2-135M-Instruct: prompts, teacher-forced NLL, pass-key, equal bytes.

Each runner takes the prompts of :func:`build_prompts` and returns result rows
(plain dicts, no wall times, so a re-run with the same seeds gives the same
rows). :mod:`balancekv.experiments.evaluate` runs them and writes the results;
:mod:`balancekv.experiments.eval_report` turns the results into tables and a plot.

Budgets are matched in kept tokens: BalanceKV keeps its sink and window (32 +
32 tokens) exactly and halves the middle, so at a nominal ``keep`` it holds a
little more than ``keep * n`` tokens; every other token-selecting method is
given BalanceKV's *realised* kept fraction. MiniKV uses its own pyramid layer
budgets (``beta = 7``) around the same mean. Methods that keep every token
(``quant``) run at ``keep = 1``; their bytes are in the table.
"""

from __future__ import annotations

import json

import numpy as np

from balancekv.experiments.eval_decode import greedy, nll

KEEPS = (0.5, 0.25, 0.125)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
#: The model every task runs (``balancekv.models``).
MODEL = "smollm2"
MODEL_LABEL = "SmolLM2-135M-Instruct"


def load():
    from balancekv import models  # noqa: PLC0415

    models.check_available(MODEL)
    return models.load_model(MODEL)


def build_prompts(n_prefix: int, n_cont: int, samples: int, lengths, depths, text: str, seed: int) -> dict:
    """Token ids of every NLL window and every pass-key prompt (saved beside the results, for kvpress)."""
    from balancekv import models, texts  # noqa: PLC0415

    tok = load().tokenizer
    body = texts.get_text(text)
    total = samples * (n_prefix + n_cont)
    ids = np.asarray(models.tokenize(MODEL, body, total), np.int64)
    windows = ids.reshape(samples, n_prefix + n_cont)
    rng = np.random.default_rng(seed)
    filler = np.asarray(models.tokenize(MODEL, texts.get_text(texts.TUNING_TEXT), max(lengths)), np.int64)
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


def eval_methods(methods=None) -> list[str]:
    """The methods to compare: ``methods`` or every registered one, without ``exact`` (that is "full")."""
    from balancekv import available_methods  # noqa: PLC0415

    names = available_methods() if methods is None else list(methods)
    return [m for m in names if m != "exact"]


def _selects(method) -> bool:
    from balancekv import get_method  # noqa: PLC0415

    return get_method(method).selects_tokens


def _cache_for(src, method, frac, seed):
    """A cache compressing ``src``'s retained prefill with ``method`` at kept fraction ``frac``."""
    from balancekv import hf  # noqa: PLC0415

    if not _selects(method):
        return hf.CompressedCache.recompress(src, method, keep=1.0, seed=seed)
    if method == "minikv":
        return hf.CompressedCache.recompress(src, method, keep=frac, budgets="pyramid", beta=7.0, seed=seed)
    return hf.CompressedCache.recompress(src, method, keep=frac, seed=seed)


def _matched(src, method, keep, frac, n, seed):
    """``method`` at BalanceKV's realised fraction ``frac``: nominal ``keep`` when that already
    realises ``frac`` (methods with BalanceKV's sink/window/halving structure), else ``keep=frac``."""
    cache = _cache_for(src, method, keep, seed)
    if abs(realised(cache, n) - frac) <= 0.01 or not _selects(method):
        return cache
    return _cache_for(src, method, frac, seed)


def realised(cache, n) -> float:
    """Kept slots over the prompt's tokens, over every layer and KV head."""
    heads = sum(int(np.prod(layer.ckv.lead)) for layer in cache.layers)
    return cache.kept_slots() / (heads * n)


def _prefill(net, ids):
    import torch  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    src = hf.CompressedCache(net, "exact", retain_prefill=True)
    logits = net(torch.tensor([ids]), cache=src, use_cache=True).logits[:, -1:]
    return src, logits


def _window_baseline(net, window, n: int):
    """Prefill the first ``n`` tokens of ``window``; ``(prefill cache, continuation ids, full-cache NLL)``."""
    import torch  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    src, _ = _prefill(net, window[:n])
    cont = torch.tensor([window[n:]])
    full = hf.CompressedCache.recompress(src, "exact", keep=1.0)
    return src, cont, nll(net(cont, cache=full, use_cache=True).logits, cont)


def run_nll(prompts, methods, keeps, seed=0, progress=True) -> list[dict]:
    """Teacher-forced NLL of each window's continuation through each method's compressed prefix cache."""
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    net = hf.enable(load().model)
    n = prompts["n_prefix"]
    rows = []
    jobs = [(s, k) for s in range(len(prompts["windows"])) for k in keeps]
    bar = tqdm(total=len(jobs) * (len(methods) + 1), desc="eval nll", disable=not progress)
    with torch.inference_mode():
        for s, w in enumerate(prompts["windows"]):
            src, cont, base = _window_baseline(net, w, n)
            for k in keeps:
                bal = hf.CompressedCache.recompress(src, "balance", keep=k, seed=seed) if "balance" in methods else None
                frac = realised(bal, n) if bal is not None else k
                full = {"task": "nll", "sample": s, "method": "full", "keep": k, "kept": 1.0, "ratio": 1.0}
                rows.append({**full, "nll": base, "delta": 0.0})
                bar.update()
                for m in methods:
                    cache = bal if m == "balance" else _matched(src, m, k, frac, n, seed)
                    kept, ratio = realised(cache, n), cache.ratio
                    try:
                        value = nll(net(cont, cache=cache, use_cache=True).logits, cont)
                    except ValueError as err:  # activations became non-finite: the estimator blew up
                        value = float("inf")
                        rows.append({"task": "nll", "sample": s, "method": m, "keep": k, "note": str(err)})
                    rows.append(
                        {
                            "task": "nll",
                            "sample": s,
                            "method": m,
                            "keep": k,
                            "kept": kept,
                            "ratio": ratio,
                            "nll": value,
                            "delta": value - base,
                        }
                    )
                    bar.update()
                    if m == "balance":
                        bal = None
    bar.close()
    return rows


def run_needle(prompts, methods, keep, steps=8, seed=0, progress=True) -> list[dict]:
    """Pass-key retrieval: the question through each method's compressed context, greedy ``steps`` tokens."""
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from balancekv import hf  # noqa: PLC0415

    lm = load()
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
                realised(hf.CompressedCache.recompress(src, "balance", keep=keep, seed=seed), n)
                if "balance" in methods
                else keep
            )
            for m in ["full"] + methods:
                cache = (
                    hf.CompressedCache.recompress(src, "exact", keep=1.0)
                    if m == "full"
                    else _matched(src, m, keep, frac, n, seed)
                )
                kept, ratio = realised(cache, n), cache.ratio
                try:
                    logits = net(q, cache=cache, use_cache=True).logits
                    answer = lm.tokenizer.decode(greedy(net, logits, cache, steps, None, position_ids=False))
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


#: ``run_bytes`` configurations: about 1/8 of the fp16 bytes each.
BYTE_CONFIGS = (
    ("minikv", dict(keep=0.5, budgets="pyramid", beta=7.0)),
    ("balance+quant", dict(keep=0.5, bits=2)),
    ("balance+quant", dict(keep=0.25, bits=4)),
    ("balance+quant", dict(keep=0.5, bits=2, group=16)),
    ("balance+quant", dict(keep=0.25, bits=4, group=16)),
)


def run_bytes(prompts, seed=0, progress=True) -> list[dict]:
    """``balance+quant`` against ``minikv`` at about 1/8 of the fp16 bytes (NLL task, same windows)."""
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from balancekv import available_methods, hf  # noqa: PLC0415

    if not {"minikv", "balance+quant"} <= set(available_methods()):
        return []
    net = hf.enable(load().model)
    n = prompts["n_prefix"]
    rows = []
    bar = tqdm(total=len(prompts["windows"]) * len(BYTE_CONFIGS), desc="eval bytes", disable=not progress)
    with torch.inference_mode():
        for s, w in enumerate(prompts["windows"]):
            src, cont, base = _window_baseline(net, w, n)
            for m, kw in BYTE_CONFIGS:
                cache = hf.CompressedCache.recompress(src, m, seed=seed, **kw)
                ratio = cache.ratio  # before the continuation is appended
                value = nll(net(cont, cache=cache, use_cache=True).logits, cont)
                rows.append(
                    {
                        "task": "bytes",
                        "sample": s,
                        "method": m,
                        "config": json.dumps(kw, sort_keys=True),
                        "kept": None,
                        "ratio": ratio,
                        "nll": value,
                        "delta": value - base,
                    }
                )
                bar.update()
    bar.close()
    return rows
