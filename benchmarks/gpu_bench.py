"""GPU benchmarks of the fast paths (SPEC section 10), reported as fractions of the hardware limit.

1. Compression: ``balancekv.fast.blocked_balance`` (Triton walk kernel, SPEC 4b published
   settings) on ``B=1, H=32, n=32768, d=128, itrs=2`` against one causal SDPA prefill of the
   same shape. Target: <= 5% of the prefill time.
2. Decode: the Triton split-K kernel over a cache keeping 1/4 of the tokens with 2-bit keys
   (per channel, group 32) and values (per token, group 32), against SDPA decode over the full
   fp16 cache. Targets: >= 4x faster, >= 60% of HBM bandwidth on the bytes the kernel reads.
3. Quantize+pack (fused Triton kernel, 2-bit, keys and values): target >= 70% of HBM bandwidth.

Bandwidth fractions use the H100 SXM HBM3 peak, 3.35 TB/s (``--peak-tbps`` to change).

    python benchmarks/gpu_bench.py            # on a CUDA machine
    python benchmarks/gpu_bench.py --tiny     # smoke test on CPU under the Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (smoke test)")
    ap.add_argument("--peak-tbps", type=float, default=3.35)
    ap.add_argument("--repeats", type=int, default=20)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import importlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    fb = importlib.import_module("balancekv.fast.blocked_balance")
    fd = importlib.import_module("balancekv.fast.decode_attention")
    fq = importlib.import_module("balancekv.fast.quantization")

    if args.tiny:
        dev, dt = torch.device("cpu"), torch.float32
        B, H, Hkv, n, d, block, reps = 1, 2, 2, 256, 32, 32, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for the interpreter smoke test")
        dev, dt = torch.device("cuda"), torch.float16
        B, H, Hkv, n, d, block, reps = 1, 32, 32, 32768, 128, 128, args.repeats
    peak = args.peak_tbps * 1e12

    def timed(fn, repeats=reps):
        fn()  # warm-up / compile
        if dev.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / repeats
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    g = torch.Generator(device="cpu").manual_seed(0)
    K = torch.randn(B, H, n, d, generator=g).to(dev, dt)
    V = torch.randn(B, H, n, d, generator=g).to(dev, dt)
    Qp = torch.randn(B, H, n, d, generator=g).to(dev, dt)
    backend = "triton"
    rows = []
    print(
        f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU (Triton interpreter)'}; "
        f"torch {torch.__version__}; shapes B={B} H={H} n={n} d={d}"
    )

    # 1. compression vs prefill
    kw = dict(itrs=2, block=block, sink=32, window=32, scale=d**-0.5, backend=backend)
    Kh, Vh = K.reshape(B * H, n, d).float(), V.reshape(B * H, n, d).float()
    t_comp = timed(lambda: fb.blocked_balance(Kh, Vh, rng=np.random.default_rng(0), **kw), max(1, reps // 4))
    t_pre = timed(lambda: F.scaled_dot_product_attention(Qp, K, V, is_causal=True))
    rows.append(
        (
            "compression (blocked balance, itrs=2)",
            t_comp,
            f"{100 * t_comp / t_pre:.1f}% of causal SDPA prefill ({t_pre * 1e3:.3f} ms); target <= 5%",
        )
    )

    # 2. decode at keep 0.25 with 2-bit storage vs SDPA over the full fp16 cache
    m = n // 4
    L = B * Hkv
    Kk, Vk = K.reshape(L, n, d)[:, :m], V.reshape(L, n, d)[:, :m]
    kw_, ks, kz = fq.quantize_pack(Kk, 2, 32, -2, backend=backend)
    vw, vs, vz = fq.quantize_pack(Vk, 2, 32, -1, backend=backend)
    Kp = fd.Packed(kw_, ks, kz, 2, 32, "tokens", m, d)
    Vp = fd.Packed(vw, vs, vz, 2, 32, "channels", m, d)
    lw = torch.full((L, m), float(np.log(4.0)), device=dev)
    q1 = torch.randn(L, 1, d, generator=g).to(dev, dt)
    t_dec = timed(lambda: fd.decode_attention(q1, Kp, Vp, lw, lw, d**-0.5, backend=backend))
    q_sdpa = q1.reshape(B, H, 1, d)
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(q_sdpa, K, V))
    read = sum(t.numel() * t.element_size() for t in (kw_, ks, kz, vw, vs, vz, lw, lw, q1))
    rows.append(
        (
            "decode, keep 0.25, 2-bit K/V (split-K)",
            t_dec,
            f"{t_sdpa / t_dec:.2f}x vs SDPA decode over fp16 cache ({t_sdpa * 1e3:.3f} ms; target >= 4x); "
            f"{read / t_dec / 1e9:.1f} GB/s = {100 * read / t_dec / peak:.1f}% of HBM (target >= 60%)",
        )
    )

    # 3. quantize + pack bandwidth (keys per channel and values per token, 2-bit, group 32)
    Kf, Vf = K.reshape(L, n, d), V.reshape(L, n, d)
    for name, x, ax in (("keys", Kf, -2), ("values", Vf, -1)):
        out = fq.quantize_pack(x, 2, 32, ax, backend=backend)
        nbytes = x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in out)
        t_q = timed(lambda x=x, ax=ax: fq.quantize_pack(x, 2, 32, ax, backend=backend))
        rows.append(
            (
                f"quantize+pack {name} 2-bit",
                t_q,
                f"{nbytes / t_q / 1e9:.1f} GB/s = {100 * nbytes / t_q / peak:.1f}% of HBM (target >= 70%)",
            )
        )

    print("| case | time (ms) | result |\n|---|---:|---|")
    for c, t, note in rows:
        print(f"| {c} | {t * 1e3:.3f} | {note} |")
    if args.tiny:
        print("(--tiny: interpreter smoke test, timings are meaningless)")
    return rows


if __name__ == "__main__":
    main()
