"""SubGen (SPEC 5, 10): torch ``balancekv.fast.subgen`` against the NumPy reference, on CPU.

Streaming SubGen on Gaussian keys/values ``H=8, n=8192, d=64``, ``t=16`` reservoir slots per
cluster, ``s_num=128`` numerator slots, threshold per head = radius of greedy k-centre with
16 centres (the method's default), uniforms drawn once and shared, so the float64 torch state
must equal the reference's (checked and printed). Also the offline variant (``m=16``).

    python benchmarks/bench_subgen.py [--repeats 3] [--n 8192]
"""

from __future__ import annotations

import argparse
import importlib
import platform

import numpy as np
import torch
from run_benchmarks import best_of

rs = importlib.import_module("balancekv.reference.subgen")
fs = importlib.import_module("balancekv.fast.subgen")


def same_state(a, b) -> bool:
    pa, pb = a.padded(), b.padded()
    if any(not np.array_equal(x, y) for x, y in zip(pa[:3], pb[:3])):
        return False
    for x, y in zip(pa[3:], pb[3:]):
        if not np.array_equal(np.isfinite(x), np.isfinite(y)):
            return False
        if np.abs(x[np.isfinite(x)] - y[np.isfinite(y)]).max(initial=0.0) > 1e-12:
            return False
    return all(ha.m == hb.m and abs(ha.mu - hb.mu) <= 1e-12 * ha.mu for ha, hb in zip(a.heads, b.heads))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=64)
    args = ap.parse_args()
    H, n, d, t, s_num, m = args.H, args.n, args.d, 16, 128, 16
    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(H, n, d)), rng.normal(size=(H, n, d))
    scale = d**-0.5
    thr = np.asarray([rs.greedy_k_center(rs.fold_scale(K[h], scale), m)[2].max() for h in range(H)])
    U = rng.random((n, H, t + s_num))
    kw = dict(t=t, s_num=s_num, threshold=thr, scale=scale, uniforms=U)
    Kt, Vt = torch.from_numpy(K), torch.from_numpy(V)
    fs.subgen_stream(Kt[:, :256], Vt[:, :256], **{**kw, "uniforms": U[:256]})  # warm-up
    t_ref, ref = best_of(lambda: rs.subgen_stream(K, V, **kw), args.repeats)
    t64, f64 = best_of(lambda: fs.subgen_stream(Kt, Vt, **kw), args.repeats)
    t32, _ = best_of(lambda: fs.subgen_stream(Kt.float(), Vt.float(), **kw), args.repeats)
    okw = dict(t=t, s_num=s_num, m=m, scale=scale)
    to_ref, oref = best_of(lambda: rs.subgen_offline(K, V, rng=np.random.default_rng(1), **okw), args.repeats)
    to64, of64 = best_of(lambda: fs.subgen_offline(Kt, Vt, rng=np.random.default_rng(1), **okw), args.repeats)
    print(
        f"# machine {platform.machine()} {platform.processor() or 'cpu'}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}"
    )
    print(f"# H={H} n={n} d={d} t={t} s_num={s_num}; stream clusters per head {[h.m for h in ref.heads]}")
    print("| case | time (s) | speed-up | note |\n|---|---:|---:|---|")
    print(f"| SubGen stream, NumPy reference (float64) | {t_ref:.3f} | 1.0x | definition |")
    same = same_state(ref, f64)
    print(f"| SubGen stream, torch float64 | {t64:.3f} | {t_ref / t64:.1f}x | same state as reference: {same} |")
    print(f"| SubGen stream, torch float32 geometry | {t32:.3f} | {t_ref / t32:.1f}x | |")
    print(f"| SubGen offline (m={m}), NumPy reference | {to_ref:.3f} | 1.0x | definition |")
    print(
        f"| SubGen offline, torch float64 | {to64:.3f} | {to_ref / to64:.1f}x | same state as reference: "
        f"{same_state(oref, of64)} |"
    )


if __name__ == "__main__":
    main()
