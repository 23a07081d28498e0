"""Device-native compression and real inference: the targets of the device-native issue, side by side.

Run:  python benchmarks/bench_inference.py [--quick] [--repeats R] [--sections compress,eps,generate,decode,memory]

Prints markdown tables (record them in benchmarks/README.md with the command and the machine):

1. ``compress`` speed, float32 torch CPU vs the NumPy reference, ``balance`` with observed
   queries: 8 heads x 8192 tokens x d 64, and one SmolLM2 layer (3 heads x 2048). The ideal
   time is the FLOP count of the build (Gram tiles of every round, the query-aware key factor,
   the heavy-hitter scores) divided by this machine's measured fp32 matmul rate on the same
   threads (a 2048^3 matmul), stated beside it.
2. ``eps`` mode against ``keep`` mode at the level the eps search picked (balance and the other
   methods; interleaved, median of repeats).
3. SmolLM2 generation (2048-token prompt of real text, 32 greedy tokens): end-to-end
   ``generate`` time, compression share of the prefill, decode time per token, each method
   against the plain cache, interleaved, median of repeats.
4. Decode only (``decode``): every cache prefilled once, then interleaved rounds of a few greedy
   tokens per cache; the median per-token time against the plain cache (less noisy than the
   generate section's decode column on a shared machine).
5. Memory: bytes of every tensor reachable from the cache (gc walk, each storage once) against
   its ``nbytes`` and against the plain cache's bytes.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import balancekv
from balancekv.synthetic import make_kv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _memory import reachable_array_bytes

GEN_METHODS = ["balance", "snapkv", "minikv", "quant", "balance+quant"]


def keep_kwargs(method: str) -> dict:
    """The budget every section runs a method at: keep 0.25 for token-selecting methods, else every token."""
    return {"keep": 0.25 if balancekv.get_method(method).selects_tokens else 1.0}


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_rate(threads: int) -> float:
    """Measured fp32 FLOP/s of a 2048^3 matmul on ``threads`` threads (this machine's limit proxy)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = timed(lambda: a @ b, 5)
    return 2 * 2048**3 / t


def balance_flops(H: int, n: int, d: int, L: int, itrs: int, block: int = 64, heavy_rounds: int = 2) -> float:
    """FLOPs of ``balance`` with ``L`` observed queries at ``itrs`` rounds (heavy-hitter hybrid):
    heavy-hitter scores ``2 H L n d``; per walk round over ``m`` tokens, the query factor
    ``2 m L d`` (scores) + ``2 m block L`` (G = phi^T phi) and the value factor ``2 m block d``."""
    fl = 2 * H * L * n * d
    m = n
    for _ in range(itrs + heavy_rounds):
        fl += H * (2 * m * L * d + 2 * m * block * L + 2 * m * block * d)
        m //= 2
    return float(fl)


def section_compress(args, rate):
    print("\n### compress speed (balance, observed queries, keep 0.25)\n")
    print("| problem | NumPy reference (s) | torch f32 (s) | speed-up | ideal (s) | torch / ideal | GFLOP |")
    print("|---|---|---|---|---|---|---|")
    cases = [(8, 8192, 64, 64), (3, 2048, 64, 96)] if not args.quick else [(3, 2048, 64, 96)]
    for H, n, d, L in cases:
        K, V, Q = make_kv("llm", heads=H, n=n, d=d, q=L, seed=0)
        Kt, Vt, Qt = (torch.from_numpy(x).float() for x in (K, V, Q))
        ref = lambda K=K, V=V, Q=Q: balancekv.compress(K, V, keep=0.25, method="balance", queries=Q, seed=0)
        fast = lambda K=Kt, V=Vt, Q=Qt: balancekv.compress(K, V, keep=0.25, method="balance", queries=Q, seed=0)
        t_ref = timed(ref, max(1, args.repeats // 2))
        t_fast = timed(fast, args.repeats)
        fl = balance_flops(H, n, d, L, itrs=2)
        ideal = fl / rate
        print(
            f"| {H} x {n} x {d}, {L} queries | {t_ref:.3f} | {t_fast:.4f} | {t_ref / t_fast:.1f}x | {ideal:.4f} | "
            f"{t_fast / ideal:.1f}x | {fl / 1e9:.2f} |"
        )


def timed_pair(f, g, repeats: int) -> tuple[float, float]:
    """Median wall times of ``f()`` and ``g()``, interleaved ``f, g, f, g, ...`` (after one warm-up each), so
    that a change in the machine's load hits both alike."""
    f(), g()
    tf, tg = [], []
    for _ in range(repeats):
        for fn, ts in ((f, tf), (g, tg)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(tg)


#: (method, options, eps values) of the eps section: balance at three targets, the others at one
EPS_CASES = [
    ("balance", {}, (0.05, 0.1, 0.2)),
    ("uniform-halving", {}, (0.5,)),
    ("snapkv", {}, (0.1,)),
    ("h2o", {}, (0.1,)),
    ("balance+quant", {}, (0.1,)),
    ("quant", {}, (0.05,)),
]


def section_eps(args):
    print("\n### eps mode against keep mode at the level it picks (torch f32, observed queries, margin=1)\n")
    print(
        "| problem | method | eps | level picked per head | levels built | keep-mode time (s) | eps-mode time (s) "
        "| ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    H, n, d, L = (3, 2048, 64, 96)
    K, V, Q = (torch.from_numpy(x).float() for x in make_kv("llm", heads=H, n=n, d=d, q=L, seed=0))
    cases = EPS_CASES if not args.quick else EPS_CASES[:1]
    for method, opts, targets in cases:
        for eps in targets:
            # margin=1: the search's cost at the levels the rule itself picks (the calibrated shift margin of
            # 3.5 would store these synthetic heads exactly at most targets: nothing left to time)
            run_eps = lambda eps=eps, m=method, o=opts: balancekv.compress(
                K, V, eps, method=m, queries=Q, seed=0, margin=1.0, **o
            )
            c = run_eps()
            lv = c.diagnostics["level_per_head"].ravel().tolist()
            levels = c.diagnostics["levels"]
            top = max(set(lv), key=lv.count)  # keep mode at the level most heads picked
            picked = [levels[i] if i else "exact" for i in lv]
            if top == 0:
                print(f"| {H} x {n} | {method} | {eps} | {picked} | - | - | - | - |")
                continue
            level = levels[top]
            kw = {"keep": level.get("keep", 1.0), **({"bits": level["bits"]} if "bits" in level else {})}
            run_keep = lambda m=method, o=opts, kw=kw: balancekv.compress(K, V, method=m, queries=Q, seed=0, **o, **kw)
            t_keep, t_eps = timed_pair(run_keep, run_eps, args.repeats)
            built = len(c.diagnostics.get("levels_built", levels)) - 1  # compressed levels built (exact excluded)
            print(
                f"| {H} x {n} | {method} | {eps} | {picked} | {built} of {len(levels) - 1} | {t_keep:.4f} | "
                f"{t_eps:.4f} | {t_eps / t_keep:.2f}x |"
            )


def _prompt(n):
    from balancekv import models
    from balancekv.texts import get_text

    ids = models.tokenize("smollm2", get_text("python-docs"), n)
    return torch.tensor([ids])


def section_generate(args):
    from transformers import DynamicCache

    from balancekv import hf, models

    net = models.load_model("smollm2").model
    n = 512 if args.quick else 2048
    new = 8 if args.quick else 32
    ids = _prompt(n)
    methods = GEN_METHODS[:2] if args.quick else GEN_METHODS
    kwargs = {m: keep_kwargs(m) for m in methods}

    comp_time = {}
    original = hf.CompressedLayer.compress_from

    def timed_compress(self, *a, **k):
        t0 = time.perf_counter()
        original(self, *a, **k)
        comp_time[self.parent.method] = comp_time.get(self.parent.method, 0.0) + time.perf_counter() - t0

    hf.CompressedLayer.compress_from = timed_compress

    def run(method):
        """(end-to-end generate, prefill forward, decode per token) seconds for one method (None: plain)."""
        comp_time.pop(method, None)
        if method is None:
            hf.disable(net)
            make = lambda: DynamicCache(config=net.config)
        else:
            hf.enable(net)
            make = lambda: hf.CompressedCache(net, method, **kwargs[method])
        with torch.no_grad():
            t0 = time.perf_counter()
            net.generate(ids, cache=make(), max_new_tokens=new, do_sample=False)
            e2e = time.perf_counter() - t0
            comp_time.pop(method, None)  # the compression of the timed prefill below only (not generate's too)
            cache = make()
            t0 = time.perf_counter()
            out = net(ids, cache=cache, use_cache=True)
            prefill = time.perf_counter() - t0
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new):
                tok = net(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            decode = (time.perf_counter() - t0) / new
        return e2e, prefill, decode, comp_time.get(method, 0.0), cache

    rows = {m: [] for m in [None] + methods}
    for _ in tqdm(range(args.repeats), desc="generate (interleaved repeats)"):
        for m in [None] + methods:
            rows[m].append(run(m)[:4])
    med = {m: [statistics.median(r[i] for r in rs) for i in range(4)] for m, rs in rows.items()}
    e0, p0, d0, _ = med[None]
    print(
        f"\n### SmolLM2 generation, {n}-token prompt (python-docs text), {new} greedy tokens, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print(
        "| method | generate (s) | vs plain | prefill (s) | compression (s) | compression / prefill | "
        "decode / token (ms) | vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(f"| plain DynamicCache | {e0:.2f} | 1.00x | {p0:.2f} | - | - | {1e3 * d0:.1f} | 1.00x |")
    for m in methods:
        e, p, d, c = med[m]
        print(
            f"| {m} ({kwargs[m]}) | {e:.2f} | {e / e0:.2f}x | {p:.2f} | {c:.3f} | {c / max(p - c, 1e-9):.1%} | "
            f"{1e3 * d:.1f} | {d / d0:.2f}x |"
        )
    hf.CompressedLayer.compress_from = original
    hf.disable(net)
    return net, ids


def section_decode(args):
    """Decode only, interleaved: every cache prefilled once, then rounds of ``block`` greedy tokens per cache in
    turn (plain first), so a change of the machine's load hits every row alike; median ms per token over rounds."""
    from transformers import DynamicCache

    from balancekv import hf, models

    net = models.load_model("smollm2").model
    n, block, rounds = (512, 2, 3) if args.quick else (2048, 4, max(4, 3 * args.repeats))
    ids = _prompt(n)
    rows = [(m, keep_kwargs(m)) for m in GEN_METHODS]
    rows.insert(rows.index(("quant", {"keep": 1.0})) + 1, ("quant", {"keep": 1.0, "policy": "kivi-batched"}))
    configs = {None: None, **{f"{m} {kw}": (m, kw) for m, kw in (rows[:2] if args.quick else rows)}}
    methods = list(configs)
    state = {}
    with torch.no_grad():
        for m in methods:
            if m is None:
                hf.disable(net)
                cache = DynamicCache(config=net.config)
            else:
                hf.enable(net)
                cache = hf.CompressedCache(net, configs[m][0], **configs[m][1])
            state[m] = [cache, net(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)]
        ts = {m: [] for m in methods}
        for _ in tqdm(range(rounds), desc="decode (interleaved rounds)"):
            for m in methods:
                (hf.disable if m is None else hf.enable)(net)
                cache, tok = state[m]
                t0 = time.perf_counter()
                for _ in range(block):
                    tok = net(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                ts[m].append((time.perf_counter() - t0) / block)
                state[m][1] = tok
    hf.disable(net)
    med = {m: statistics.median(v) for m, v in ts.items()}
    print(
        f"\n### SmolLM2 decode only, {n}-token prompt prefilled once per cache, {rounds} interleaved rounds of "
        f"{block} greedy tokens (median per token)\n"
    )
    print("| cache | decode / token (ms) | vs plain | fastest round (ms) |")
    print("|---|---|---|---|")
    for m in methods:
        name = "plain DynamicCache" if m is None else m
        print(f"| {name} | {1e3 * med[m]:.1f} | {med[m] / med[None]:.2f}x | {1e3 * min(ts[m]):.1f} |")


def section_memory(args, net=None, ids=None):
    from transformers import DynamicCache

    from balancekv import hf, models

    if net is None:
        net = models.load_model("smollm2").model
        ids = _prompt(512 if args.quick else 2048)
    methods = balancekv.available_methods()
    kwargs = {m: keep_kwargs(m) for m in methods}
    with torch.no_grad():
        plain = DynamicCache(config=net.config)
        hf.disable(net)
        net(ids, cache=plain, use_cache=True)
    plain_bytes = reachable_array_bytes(plain, stop=(net,))
    print(
        f"\n### memory held by the cache after a {ids.shape[1]}-token prefill + 8 decode tokens "
        f"(plain cache: {plain_bytes / 1e6:.1f} MB)\n"
    )
    print("| method | held (MB, gc walk) | nbytes (MB) | held / nbytes | held / plain cache |")
    print("|---|---|---|---|---|")
    for m in tqdm(methods, desc="memory"):
        with hf.compressed(net, m, **kwargs[m]) as cache, torch.no_grad():
            tok = net(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(8):
                tok = net(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        gc.collect()
        held = reachable_array_bytes(cache, stop=(net,))
        print(
            f"| {m} ({kwargs[m]}) | {held / 1e6:.2f} | {cache.nbytes / 1e6:.2f} | {held / cache.nbytes:.3f} | "
            f"{held / plain_bytes:.3f} |"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    ap.add_argument("--sections", default="compress,eps,generate,decode,memory", help="comma-separated sections to run")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    print(
        f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    if "compress" in sections:
        rate = matmul_rate(args.threads)
        print(f"measured fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s ({args.threads} threads)")
        section_compress(args, rate)
    if "eps" in sections:
        section_eps(args)
    state = {}
    if "generate" in sections:
        net, ids = section_generate(args)
        state = dict(net=net, ids=ids)
    if "decode" in sections:
        section_decode(args)
    if "memory" in sections:
        section_memory(args, **state)


if __name__ == "__main__":
    main()
