"""Streaming and sublinear methods on real SmolLM2 caches (issue 14): errors vs uniform at equal bytes,
SubGen memory growth on a clusterable stream, balance-stream compress time vs n.

Usage (CPU; captures are cached in /tmp/balancekv_stream_caps)::

    .venv/bin/python benchmarks/stream_methods.py errors --text python-docs      # report text
    .venv/bin/python benchmarks/stream_methods.py errors --text numpy-license    # tuning text
    .venv/bin/python benchmarks/stream_methods.py memory
    .venv/bin/python benchmarks/stream_methods.py time

Protocol (errors): one layer's cache of SmolLM2-135M on the first ``n = 2048`` tokens of a text;
the first ``n - 128`` tokens are compressed (torch float32 path, ``compress(..., keep=rate)``, probes =
the last 66 prompt queries of each KV head's query group); the next 128 queries of all 9 query heads
attend to the compressed prefix (grouped-query: each KV head serves its 3 query heads); the error is
the mean over queries and heads of ``||z - Attn|| / ||Attn||``. Uniform sampling is run at *equal
bytes*: with the kept fraction whose ``nbytes`` matches the method's (``nbytes`` = every array the
cache holds, incl. the stream's state), and StreamingLLM likewise (the most kept tokens within the method's bytes).
``--seeds S`` averages the method and uniform over seeds ``0 .. S-1``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import balancekv
from balancekv.methods.base import UnreliableEstimateWarning

CAPS = Path("/tmp/balancekv_stream_caps")
LAYERS = (1, 15, 28)
RATES = (1 / 2, 1 / 4, 1 / 8)
QUERIES = 128
PROBES = 22  # per query head: 3 x 22 = 66 probes per KV head

CONFIGS = {
    "balance-stream": {},
    "balance-stream:theory": {"variant": "theory"},
    "subgen": {},
    "subgen:stream": {"variant": "stream"},
    "subgen:l2": {"estimator": "l2"},
    "streaming": {},
}


def load(text: str, n: int, layer: int):
    CAPS.mkdir(exist_ok=True)
    f = CAPS / f"{text}_{n}_{layer}.npz"
    if not f.exists():
        from balancekv.models import capture_layers
        from balancekv.texts import get_text

        cap = capture_layers("smollm2", get_text(text), n, [layer])[layer]
        np.savez(f, q=cap.queries, k=cap.keys, v=cap.values, g=cap.kv_group, scale=cap.scale)
    z = np.load(f)
    return z["q"], z["k"], z["v"], z["g"], float(z["scale"])


def problem(text, n, layer):
    Q, K, V, g, scale = load(text, n, layer)
    n0 = n - QUERIES
    Hkv = K.shape[0]
    f = lambda x: torch.from_numpy(np.ascontiguousarray(x)).float()
    groups = [np.flatnonzero(g == h) for h in range(Hkv)]
    Qe = np.stack([np.concatenate([Q[qh, n0:n] for qh in groups[h]]) for h in range(Hkv)])
    Qp = np.stack([np.concatenate([Q[qh, n0 - PROBES : n0] for qh in groups[h]]) for h in range(Hkv)])
    Kp, Vp = f(K[:, :n0]), f(V[:, :n0])
    exact = balancekv.attention(f(Qe), Kp, Vp, scale=scale)
    return dict(K=Kp, V=Vp, Qe=f(Qe), Qp=f(Qp), scale=scale, exact=exact)


def err(c, P):
    z = c.attend(P["Qe"])
    e = torch.linalg.vector_norm(z - P["exact"], dim=-1) / torch.linalg.vector_norm(P["exact"], dim=-1)
    return float(e.mean())


def run(P, method, keep, opts, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreliableEstimateWarning)
        t0 = time.perf_counter()
        c = balancekv.compress(P["K"], P["V"], keep=keep, method=method, queries=P["Qp"], scale=P["scale"],
                               seed=seed, **opts)  # fmt: skip
        dt = time.perf_counter() - t0
    return c, err(c, P), dt


def uniform_at_bytes(P, nbytes, seed=0):
    return baseline_at_bytes(P, "uniform", nbytes, seed)


def baseline_at_bytes(P, method, nbytes, seed=0):
    """``(error, nbytes)`` of ``method`` (``uniform`` or ``streaming``) at the most kept tokens whose cache holds at
    most ``nbytes`` (bisection on the kept count; one token per head if even that is more)."""
    n = P["K"].shape[1]
    fits = {}

    def build(m):
        if m not in fits:
            fits[m] = run(P, method, m / n, {}, seed)[:2]
        return fits[m]

    lo, hi = 1, n
    if build(n)[0].nbytes <= nbytes:
        lo = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if build(mid)[0].nbytes <= nbytes else (lo, mid)
    c, e = build(lo)
    return e, c.nbytes


def cmd_errors(args):
    rows = []
    names = args.methods.split(",") if args.methods else list(CONFIGS)
    for layer in args.layers:
        P = problem(args.text, args.n, layer)
        for rate in RATES:
            base = None  # (uniform, StreamingLLM) at the first method's bytes, for --shared-baselines
            for name in names:
                method = name.split(":")[0]
                opts = dict(CONFIGS.get(name, {}))
                for kv in args.opt or []:
                    if kv.startswith(name + "."):
                        k, v = kv[len(name) + 1 :].split("=")
                        opts[k] = type(opts.get(k, 0.0))(v) if k in opts else _parse(v)
                # the mean over seeds of the method and of uniform at each seed's bytes (StreamingLLM draws nothing)
                got = [run(P, method, rate, opts, seed) for seed in range(args.seeds)]
                c, dt = got[0][0], got[0][2]
                e = float(np.mean([g[1] for g in got]))
                if args.shared_baselines and base is not None:
                    (eu, ub), (es, sb) = base  # exploration: the first method's baselines (its bytes)
                else:
                    us = [uniform_at_bytes(P, g[0].nbytes, seed) for seed, g in enumerate(got)]
                    eu, ub = float(np.mean([u[0] for u in us])), max(u[1] for u in us)
                    es, sb = baseline_at_bytes(P, "streaming", min(g[0].nbytes for g in got))
                    base = (eu, ub), (es, sb)
                ur, sr = ub / c.input_nbytes, sb / c.input_nbytes
                rows.append((layer, rate, name, e, c.ratio, eu, ur, es, sr, dt))
                print(f"L{layer:<3d} 1/{round(1 / rate)}  {name:24s} err {e:8.3f}  ratio {c.ratio:.3f}   "
                      f"uniform@bytes {eu:.3f} (ratio {ur:.3f})  streaming@bytes {es:.3f} (ratio {sr:.3f})  "
                      f"{dt * 1e3:7.1f} ms", flush=True)  # fmt: skip
    print()
    print(
        "| layer | rate | method | error | ratio | uniform at equal bytes (ratio) | method / uniform "
        "| StreamingLLM at equal bytes (ratio) | method / StreamingLLM |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layer, rate, name, e, r, eu, ur, es, sr, _ in rows:
        print(
            f"| {layer} | 1/{round(1 / rate)} | {name} | {e:.3f} | {r:.3f} | {eu:.3f} ({ur:.3f}) | {e / eu:.2f} "
            f"| {es:.3f} ({sr:.3f}) | {e / es:.2f} |"
        )


def _parse(v):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def clusterable_stream(n, d=32, clusters=16, radius=0.05, value_noise=0.3, seed=0, heads=2):
    """Keys from ``clusters`` tight clusters (radius ``radius`` around unit-norm centres times sqrt(d)),
    tokens in random cluster order; values = a per-cluster value plus noise of relative size
    ``value_noise`` (``value_noise=None``: i.i.d. normal values, unrelated to the clusters)."""
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(heads, clusters, d))
    C *= np.sqrt(d) / np.linalg.norm(C, axis=-1, keepdims=True)
    lab = rng.integers(0, clusters, size=(heads, n))
    K = np.take_along_axis(C, lab[..., None], 1) + radius * rng.normal(size=(heads, n, d))
    if value_noise is None:
        V = rng.normal(size=(heads, n, d))
    else:
        Cv = rng.normal(size=(heads, clusters, d))
        V = np.take_along_axis(Cv, lab[..., None], 1) + value_noise * rng.normal(size=(heads, n, d))
    return torch.from_numpy(K).float(), torch.from_numpy(V).float()


def cmd_memory(args):
    """SubGen (stream variant, m = 16 clusters) on a clusterable stream: eps mode on the first n tokens,
    then 7n more appended in chunks of 256; memory (nbytes) and error at the end of the stream."""
    n = args.n_mem
    for vn in (0.3, None):
        Kt, Vt = clusterable_stream(8 * n, value_noise=vn)
        for est in ("cluster", "l2"):
            for eps in (0.1, 0.2, 0.3, 0.5):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UnreliableEstimateWarning)
                    c = balancekv.compress(Kt[:, :n], Vt[:, :n], eps, method="subgen", variant="stream", m=16,
                                           estimator=est, seed=0)  # fmt: skip
                b0, lv = c.nbytes, c.diagnostics["level_per_head"].tolist()
                for a in range(n, 8 * n, 256):
                    c.append(Kt[:, a : a + 256], Vt[:, a : a + 256])
                Q = Kt[:, -64:]
                ex = balancekv.attention(Q, Kt, Vt)
                nrm = torch.linalg.vector_norm
                e = float((nrm(c.attend(Q) - ex, dim=-1) / nrm(ex, dim=-1)).mean())
                print(f"values={'cluster+noise ' + str(vn) if vn is not None else 'iid normal':20s} estimator={est:8s} "
                      f"eps={eps}: level per head {lv}, error at n {c.diagnostics['error']:.3f}, "
                      f"nbytes {b0} -> {c.nbytes} at 8n (x{c.nbytes / b0:.2f}), error at 8n {e:.3f}, "
                      f"ratio at 8n {c.ratio:.3f}", flush=True)  # fmt: skip


def cmd_time(args):
    """balance-stream compress time vs n (torch float32, 4 heads, d = 64, keep 0.25): fitted exponent."""
    rng = np.random.default_rng(0)
    ns = [2048, 4096, 8192, 16384, 32768]
    for variant in ("joint", "theory") if args.theory else ("joint",):
        ts = []
        for n in ns:
            K = torch.from_numpy(rng.normal(size=(4, n, 64))).float()
            V = torch.from_numpy(rng.normal(size=(4, n, 64))).float()
            best = np.inf
            for _ in range(2):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    balancekv.compress(K, V, keep=0.25, method="balance-stream", variant=variant, seed=0)
                best = min(best, time.perf_counter() - t0)
            ts.append(best)
            print(f"{variant} n={n}: {best:.3f} s", flush=True)
        slope = np.polyfit(np.log(ns), np.log(ts), 1)[0]
        print(f"{variant}: time ~ n^{slope:.3f} (least squares over n = {ns})")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("errors")
    e.add_argument("--text", default="python-docs")
    e.add_argument("--n", type=int, default=2048)
    e.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    e.add_argument("--methods", default="")
    e.add_argument("--seeds", type=int, default=1, help="seeds averaged for the method and uniform (default 1)")
    e.add_argument(
        "--shared-baselines",
        action="store_true",
        help="exploration: every method is compared with the first method's baselines (at its bytes)",
    )
    e.add_argument("--opt", action="append", help="method.option=value, e.g. subgen.window_frac=0.5")
    m = sub.add_parser("memory")
    m.add_argument("--n-mem", type=int, default=1024)
    t = sub.add_parser("time")
    t.add_argument("--theory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"errors": cmd_errors, "memory": cmd_memory, "time": cmd_time}[args.cmd](args)


if __name__ == "__main__":
    main()
