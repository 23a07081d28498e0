"""Fast-path benchmarks on this machine; writes the "Fast paths" section of benchmarks/README.md.

CPU: torch ``blocked_balance`` (SPEC 4b, vectorised over heads and blocks) against the NumPy
reference on ``H=8, n=8192, d=64, itrs=2`` (published settings: block 128, sink 32,
window 32), measured side by side in one run; the two must select the same tokens.

    python benchmarks/run_benchmarks.py [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- fast-paths:begin -->", "<!-- fast-paths:end -->"


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_balance(repeats: int, H=8, n=8192, d=64, itrs=2):
    rb = importlib.import_module("balancekv.reference.blocked_balance")
    fb = importlib.import_module("balancekv.fast.blocked_balance")
    rng = np.random.default_rng(0)
    K = rng.normal(size=(H, n, d))
    V = rng.normal(size=(H, n, d))
    kw = dict(itrs=itrs, block=128, sink=32, window=32, scale=d**-0.5)
    t_ref, (ri, rl) = best_of(lambda: rb.blocked_balance(K, V, rng=np.random.default_rng(1), **kw), repeats)
    Kt, Vt = torch.from_numpy(K), torch.from_numpy(V)
    t64, (fi, fl) = best_of(
        lambda: fb.blocked_balance(Kt, Vt, rng=np.random.default_rng(1), backend="torch", **kw), repeats
    )
    same = bool(np.array_equal(fi, ri) and np.array_equal(fl, rl))
    t32, _ = best_of(
        lambda: fb.blocked_balance(Kt.float(), Vt.float(), rng=np.random.default_rng(1), backend="torch", **kw), repeats
    )
    return [
        ("balance (SPEC 4b) H=8 n=8192 d=64 itrs=2, NumPy reference (float64)", t_ref, 1.0, "definition"),
        ("balance, torch float64", t64, t_ref / t64, f"same tokens as reference: {same}"),
        ("balance, torch float32", t32, t_ref / t32, ""),
    ]


def section(rows) -> str:
    lines = [
        BEGIN,
        "## Fast paths (CPU, `benchmarks/run_benchmarks.py`)",
        "",
        f"- date: {_dt.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{platform.processor() or 'cpu'}, torch threads {torch.get_num_threads()}",
        f"- versions: python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        "- best of repeats, wall time; speed-up relative to the NumPy reference",
        "",
        "| case | time (s) | speed-up | note |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {c} | {t:.3f} | {s:.1f}x | {note} |" for c, t, s, note in rows]
    lines += [
        "",
        "GPU benchmarks (compression vs SDPA prefill, decode vs SDPA, quantize+pack bandwidth): "
        "`python benchmarks/gpu_bench.py` on a CUDA machine (`--tiny` runs it end to end under the "
        "Triton interpreter as a smoke test; its timings mean nothing).",
        END,
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    old = README.read_text() if README.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    README.write_text(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = bench_balance(args.repeats)
    text = section(rows)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
