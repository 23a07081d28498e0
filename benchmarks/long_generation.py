"""Long generation under a memory cap (issue 14, item 4): teacher-forced SmolLM2 through capped caches.

Usage (CPU)::

    .venv/bin/python benchmarks/long_generation.py                    # 64 + 2048 tokens, caps 256 and 512
    .venv/bin/python benchmarks/long_generation.py --quick            # 64 + 256 tokens, cap 128 (a smoke run)
    .venv/bin/python benchmarks/long_generation.py --jobs 3           # the runs in 3 parallel processes
    .venv/bin/python benchmarks/long_generation.py --replot           # tables and plot from the saved JSON

Protocol: SmolLM2-135M-Instruct (float32), the first ``prompt + cont + queries`` tokens of the REPORT
text (``python-docs``). The ``prompt`` tokens are prefilled (shorter than every cap, so held exactly),
then the ``cont`` continuation tokens are teacher-forced ``chunk`` tokens per forward (default 16: one
token per forward, ``--chunk 1``, takes about 1.3 s per token and method on the shared 2-core machine) through an
``hf.CompressedCache(model, method, cap=C)``: every layer holds at most ``C`` tokens per KV head, and
the tokens of a forward attend (causally among themselves) to the cache state the policy left after
the previous forward. The log-probability of each true next token is collected (``cont`` targets:
the first one is predicted by the prefill's last position). The reference is the same loop with
transformers' plain ``DynamicCache`` (the full cache). Reported per method and cap: mean NLL, ΔNLL
against the full cache (all tokens and the last 512), the cache's ``nbytes`` at the end and its peak
(sampled every 64 fed tokens), bytes relative to the full cache at the end of the stream, and the
time per fed token relative to the full cache's loop (wall clock, so only indicative on a shared
machine, and more so with ``--jobs``).

Attention error (fig1-style): at the end of the stream (``S = prompt + cont - 1`` tokens in the
cache), for layers 1, 15, 28 (0-based, the layers of the issue's table), the queries of the next
``queries`` tokens from a full forward pass (all 9 query heads, grouped 3 per KV head) attend to each
layer's capped cache (``layer.ckv.attend(Q)``) and to the exact keys and values of the whole stream
(the same forward pass); error = mean over queries and heads of ``||z - Attn|| / ||Attn||``.

A method whose ``cap=`` is refused (``ValueError``, e.g. ``subgen`` before its capped policy lands)
is skipped with a printed note. Results: ``benchmarks/results/long_generation[_quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("streaming", "h2o", "balance", "balance-stream", "subgen")
COLORS = {
    "streaming": "tab:gray",
    "h2o": "tab:orange",
    "balance": "tab:blue",
    "balance-stream": "tab:green",
    "subgen": "tab:purple",
}
LAYERS = (1, 15, 28)
RESULTS = Path(__file__).parent / "results"
SAMPLE_EVERY = 64
LAST = 512


# ---------------------------------------------------------------------- data
def token_ids(args) -> list[int]:
    from balancekv import models
    from balancekv.texts import get_text

    return models.tokenize("smollm2", get_text(args.text), args.prompt + args.cont + args.queries)


def capture_path(work: Path) -> Path:
    return work / "capture.npz"


def capture(args, work: Path) -> None:
    """Queries, keys and values of ``args.layers`` over the whole stream plus the held-out queries (one forward)."""
    from balancekv import models

    path = capture_path(work)
    if path.exists():
        return
    ids = token_ids(args)
    # models._run_capture: the package's recording sdpa hook over an explicit token list (the same ids as the runs)
    found = models._run_capture("smollm2", ids, list(args.layers))
    arrays = {}
    for L, (q, k, v, scale) in found.items():
        arrays[f"q{L}"], arrays[f"k{L}"], arrays[f"v{L}"] = q, k, v
        arrays[f"scale{L}"] = np.float64(scale)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


# ---------------------------------------------------------------------- one run
def dynamic_nbytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def attention_errors(args, cache, S: int, work: Path) -> dict:
    """fig1-style error of each layer's capped cache for the next ``args.queries`` queries."""
    import torch

    from balancekv.api import relative_error

    z_npz = np.load(capture_path(work))
    out = {}
    for L in args.layers:
        q, k, v = (torch.from_numpy(z_npz[f"{x}{L}"]) for x in "qkv")
        scale = float(z_npz[f"scale{L}"])
        Hq, Hkv = q.shape[0], k.shape[0]
        g = Hq // Hkv
        Q = q[:, S : S + args.queries].reshape(Hkv, g * args.queries, -1)  # query head h reads KV head h // g
        Kx, Vx = k[:, :S].double(), v[:, :S].double()
        exact = torch.softmax(scale * Q.double() @ Kx.transpose(-1, -2), -1) @ Vx
        ckv = cache.layers[L].ckv
        z = ckv.attend(Q[None].float())[0]
        out[str(L)] = float(relative_error(z.double(), exact).mean())
    return out


def one_run(args, method: str | None, cap: int | None, work: Path) -> dict:
    """Teacher-force the continuation through one cache; the row of results (``method`` None: full cache)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from balancekv import hf, models

    torch.set_num_threads(args.threads)
    net = models.load_model("smollm2").model
    ids = torch.tensor([token_ids(args)])
    P, C = args.prompt, args.cont
    name = "full" if method is None else f"{method}@{cap}"
    if method is None:
        hf.disable(net)
        cache = DynamicCache(config=net.config)
        nbytes = lambda: dynamic_nbytes(cache)
    else:
        hf.enable(net)
        try:
            cache = hf.CompressedCache(net, method, cap=cap)
        except ValueError as err:
            hf.disable(net)
            print(f"note: {method} at cap {cap} skipped: compress(..., cap=) raises ValueError: {err}", flush=True)
            return {"name": name, "method": method, "cap": cap, "skipped": str(err)}
        nbytes = lambda: cache.nbytes
    logp = []
    samples = []  # (tokens in the cache, nbytes)

    def take(logits, targets):
        lp = torch.log_softmax(logits[0].float(), -1)
        logp.extend(lp.gather(-1, targets[0][:, None])[:, 0].tolist())

    # torch.no_grad, not inference_mode: online h2o reads tensor version counters (inference tensors have none)
    with torch.no_grad():
        out = net(ids[:, :P], cache=cache, use_cache=True)
        take(out.logits[:, -1:], ids[:, P : P + 1])
        samples.append((P, nbytes()))
        end = P + C - 1  # the last target ids[P + C - 1] is predicted after feeding ids[P + C - 2]
        t0 = time.perf_counter()
        bar = tqdm(total=end - P, desc=f"{name} (chunk {args.chunk})", mininterval=5, file=sys.stdout)
        for i in range(P, end, args.chunk):
            j = min(i + args.chunk, end)
            out = net(ids[:, i:j], cache=cache, use_cache=True)
            take(out.logits, ids[:, i + 1 : j + 1])
            if (j - P) % SAMPLE_EVERY == 0 or j == end:
                samples.append((j, nbytes()))
            bar.update(j - i)
        bar.close()
        per_token = (time.perf_counter() - t0) / (end - P)
    logp = np.asarray(logp)
    if not np.all(np.isfinite(logp)):
        bad = int(np.argmin(np.isfinite(logp)))
        print(f"note: {name}: non-finite log-probability at continuation token {bad}", flush=True)
    row = {
        "name": name,
        "method": method or "full",
        "cap": cap,
        "logp": logp.tolist(),
        "time_per_token": per_token,
        "nbytes_end": int(samples[-1][1]),
        "nbytes_peak": int(max(b for _, b in samples)),
        "samples": samples,
        "stream_tokens": end,
    }
    if method is not None:
        row["full_nbytes_end"] = int(cache.input_nbytes)
        row["attn_error"] = attention_errors(args, cache, end, work)
        hf.disable(net)
    return row


# ---------------------------------------------------------------------- driver
def run_names(args) -> list[tuple[str | None, int | None]]:
    runs = [(None, None)]
    for cap in args.caps:
        runs += [(m, cap) for m in args.methods]
    return runs


def row_path(work: Path, method, cap) -> Path:
    return work / ("full.json" if method is None else f"{method}@{cap}.json")


def single(args, method, cap, work: Path) -> None:
    path = row_path(work, method, cap)
    if path.exists():
        return
    row = one_run(args, method, cap, work)
    path.write_text(json.dumps(row))


def child_argv(args, method, cap, work) -> list[str]:
    argv = [sys.executable, __file__, "--prompt", str(args.prompt), "--cont", str(args.cont)]
    argv += ["--queries", str(args.queries), "--chunk", str(args.chunk), "--text", args.text]
    argv += ["--threads", str(args.threads), "--work", str(work), "--layers", *map(str, args.layers)]
    argv += ["--single", method or "full", str(cap or 0)]
    return argv


def collect(args, work: Path) -> dict:
    capture(args, work)
    runs = [r for r in run_names(args) if not row_path(work, *r).exists()]
    if args.jobs <= 1:
        for m, c in runs:
            single(args, m, c, work)
    else:
        pending, live = list(runs), []
        while pending or live:
            while pending and len(live) < args.jobs:
                m, c = pending.pop(0)
                live.append(subprocess.Popen(child_argv(args, m, c, work)))
            time.sleep(2)
            for p in [p for p in live if p.poll() is not None]:
                live.remove(p)
                if p.returncode:
                    print(f"note: run {p.args[-2:]} exited with {p.returncode}", flush=True)
    rows = {}
    for m, c in run_names(args):
        path = row_path(work, m, c)
        if path.exists():
            r = json.loads(path.read_text())
            rows[r["name"]] = r
    return rows


def summarize(args, rows: dict) -> dict:
    full = np.asarray(rows["full"]["logp"])
    out = {"config": {k: v for k, v in vars(args).items() if k not in ("work", "single", "replot")}, "runs": []}
    out["full"] = {
        "nll": float(-full.mean()),
        "nll_last": float(-full[-LAST:].mean()),
        "time_per_token": rows["full"]["time_per_token"],
        "nbytes_end": rows["full"]["nbytes_end"],
    }
    for name, r in rows.items():
        if name == "full":
            continue
        s = {k: r[k] for k in ("name", "method", "cap")}
        if "skipped" in r:
            s["skipped"] = r["skipped"]
            out["runs"].append(s)
            continue
        lp = np.asarray(r["logp"])
        d = full - lp  # NLL increase per token
        s.update(
            nll=float(-lp.mean()),
            dnll=float(d.mean()),
            dnll_last=float(d[-LAST:].mean()),
            dnll_windows=[float(w.mean()) for w in np.array_split(d, min(8, len(d)))],
            nbytes_end=r["nbytes_end"],
            nbytes_peak=r["nbytes_peak"],
            bytes_vs_full=r["nbytes_end"] / rows["full"]["nbytes_end"],
            time_vs_full=r["time_per_token"] / rows["full"]["time_per_token"],
            time_per_token=r["time_per_token"],
            attn_error=r["attn_error"],
            samples=r["samples"],
        )
        out["runs"].append(s)
    out["runs"].sort(key=lambda s: (s["cap"], METHODS.index(s["method"]) if s["method"] in METHODS else 99))
    return out


def tables(res: dict) -> str:
    cfg, f = res["config"], res["full"]
    lines = [
        f"SmolLM2-135M, text {cfg['text']}: {cfg['prompt']}-token prompt + {cfg['cont']} teacher-forced tokens, "
        f"{cfg['chunk']} token(s) per forward. Full cache (DynamicCache, fp32): NLL {f['nll']:.4f} "
        f"(last {LAST}: {f['nll_last']:.4f}), {f['nbytes_end'] / 1e6:.1f} MB at the end, "
        f"{1e3 * f['time_per_token']:.0f} ms per fed token.",
        "",
        f"| method | cap | NLL | ΔNLL | ΔNLL last {LAST} | nbytes end (MB) | peak (MB) | bytes / full | time / full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['cap']} | skipped: cap= refused | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['cap']} | {r['nll']:.4f} | {r['dnll']:+.4f} | {r['dnll_last']:+.4f} | "
            f"{r['nbytes_end'] / 1e6:.2f} | {r['nbytes_peak'] / 1e6:.2f} | {r['bytes_vs_full']:.3f} | "
            f"{r['time_vs_full']:.2f}x |"
        )
    layers = cfg["layers"]
    lines += [
        "",
        f"Attention error at the end of the stream (next {cfg['queries']} queries, mean relative error):",
        "",
        "| method | cap | " + " | ".join(f"layer {L}" for L in layers) + " | mean |",
        "|---|---" + "|---" * (len(layers) + 1) + "|",
    ]
    for r in res["runs"]:
        if "skipped" in r:
            continue
        e = [r["attn_error"][str(L)] for L in layers]
        lines.append(f"| {r['method']} | {r['cap']} | " + " | ".join(f"{x:.3f}" for x in e) + f" | {np.mean(e):.3f} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if "skipped" not in r]
    caps = sorted({r["cap"] for r in runs})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    layers = res["config"]["layers"]
    fig, axes = plt.subplots(1, len(caps) + 1, figsize=(5 * (len(caps) + 1), 4))
    for ax, cap in zip(axes, caps):
        for r in runs:
            if r["cap"] != cap:
                continue
            w = np.asarray(r["dnll_windows"])
            step = res["config"]["cont"] / len(w)
            x = (np.arange(len(w)) + 0.5) * step
            ax.plot(x, w, "o-", color=COLORS[r["method"]], label=f"{r['method']} ({r['nbytes_end'] / 1e6:.1f} MB)")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"cap {cap} tokens / KV head")
        ax.set_xlabel("continuation position (window centre)")
        ax.set_ylabel("ΔNLL vs full cache (nats / token)")
        ax.legend(fontsize=8)
    ax = axes[-1]
    width = 0.8 / max(1, len(methods))
    slots = [(cap, L) for cap in caps for L in layers]
    for i, m in enumerate(methods):
        ys = []
        for cap, L in slots:
            r = next((r for r in runs if r["method"] == m and r["cap"] == cap), None)
            ys.append(np.nan if r is None else r["attn_error"][str(L)])
        ax.bar(np.arange(len(slots)) + (i - (len(methods) - 1) / 2) * width, ys, width, color=COLORS[m], label=m)
    ax.axhline(1, color="r", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(slots)), [f"L{L}\ncap {c}" for c, L in slots], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("relative attention error, end of stream")
    ax.set_title(f"single-layer error, next {res['config']['queries']} queries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 + 256 tokens, cap 128")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--cont", type=int, default=None, help="teacher-forced tokens (default 2048; quick 256)")
    ap.add_argument("--caps", type=int, nargs="*", default=None, help="default 256 512; quick 128")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--chunk", type=int, default=16, help="tokens per forward (1: one token per forward)")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="*", default=list(LAYERS))
    ap.add_argument("--text", default="python-docs")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    ap.add_argument("--work", default=None, help="per-run results (resumable); default /tmp/lg_work[_quick]")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/long_generation[_quick])")
    ap.add_argument("--replot", action="store_true", help="tables and plot from the saved JSON only")
    ap.add_argument("--single", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cont is None:
        args.cont = 256 if args.quick else 2048
    if args.caps is None:
        args.caps = [128] if args.quick else [256, 512]
    suffix = "_quick" if args.quick else ""
    work = Path(args.work or f"/tmp/lg_work{suffix}")
    stem = Path(args.out) if args.out else RESULTS / f"long_generation{suffix}"
    if args.single:
        m, c = args.single
        single(args, None if m == "full" else m, int(c) or None, work)
        return 0
    if args.replot:
        res = json.loads(stem.with_suffix(".json").read_text())
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.perf_counter()
        res = summarize(args, collect(args, work))
        res["wall_s"] = time.perf_counter() - t0
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = tables(res)
    print("\n" + md)
    print(f"\nwall time {res.get('wall_s', float('nan')):.0f} s")
    stem.with_suffix(".md").write_text(md + "\n")
    plot(res, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
