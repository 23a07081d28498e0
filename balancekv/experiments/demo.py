"""``balancekv demo``: compress one KV cache with every available method and print a table.

Columns: method, tokens kept per head (min..max), bytes, ratio to the uncompressed
cache in the input's dtype (float64 NumPy here, real and synthetic data alike: quantized
stores look 4x smaller than against fp16), and the mean relative attention error on held-out queries (not the
probes the ``eps`` search and the query-aware methods used: those are the queries
just before the scored ones, as a prompt's last queries would be). Real SmolLM2
keys and values when the ``hf`` extra is installed (see ``balancekv.models``),
synthetic data otherwise.
"""

from __future__ import annotations

import numpy as np

import balancekv
from balancekv.reference.softmax_attention import attention, relative_error
from balancekv.synthetic import make_kv


def load_demo_data(source: str, n: int, seed: int):
    """A :class:`~balancekv.experiments.real_data.KVProblem`: a real SmolLM2 layer if asked for and
    installed, else synthetic (queries split into observed probes and scored queries)."""
    if source in ("auto", "smollm2"):
        try:
            from balancekv.experiments.real_data import demo_capture  # noqa: PLC0415

            return demo_capture(n=n)
        except ImportError as err:
            if source == "smollm2":
                raise
            print(f"(real data unavailable: {err}; using synthetic data)")
    from balancekv.experiments.real_data import KVProblem  # noqa: PLC0415

    K, V, Q = make_kv("llm", heads=4, n=n, d=64, q=128, seed=seed)
    return KVProblem(
        K,
        V,
        Q[:, 64:],
        None,
        1 / np.sqrt(64),
        f"synthetic 'llm' family, 4 heads, n={n}, d=64; 64 observed + 64 scored queries",
        Q[:, :64],
    )


def run_demo(keep: float = 0.25, eps: float = 0.05, n: int = 2048, seed: int = 0, source: str = "auto") -> list[dict]:
    prob = load_demo_data(source, n, seed)
    K, V, Q = prob.K, prob.V, prob.Q
    if prob.qpos is not None:
        from balancekv.experiments.fig1 import causal_exact  # noqa: PLC0415

        exact = causal_exact(prob)
    else:
        exact = attention(Q, K, V)
    desc = prob.description
    rows = []
    print(f"data: {desc}")
    print(f"{'method':<16} {'mode':<12} {'kept/head':>11} {'bytes':>10} {'ratio':>7} {'error':>8}")
    for name in balancekv.available_methods():
        meth = balancekv.get_method(name)
        mode = {"keep": keep} if meth.selects_tokens and name != "exact" else {"eps": eps}
        if name == "exact":
            mode = {"keep": 1.0}
        ckv = balancekv.compress(K, V, method=name, seed=seed, queries=prob.probes, **mode)
        err = float(relative_error(ckv.attend(Q, positions=prob.qpos), exact).mean())
        kept = ckv.kept()
        row = {
            "method": name,
            "mode": ", ".join(f"{k}={v}" for k, v in mode.items()),
            "kept": f"{kept.min()}..{kept.max()}",
            "nbytes": ckv.nbytes,
            "ratio": ckv.ratio,
            "error": err,
        }
        rows.append(row)
        mark = " *" if err >= 1.0 else ""
        print(f"{name:<16} {row['mode']:<12} {row['kept']:>11} {ckv.nbytes:>10} {ckv.ratio:>7.3f} {err:>8.4f}{mark}")
    bad = [r["method"] for r in rows if r["error"] >= 1.0]
    if bad:  # never silent: an error of 1 or more is no better than returning zero
        print(
            f"* error >= 1: {', '.join(bad)} did worse on these queries than returning zero (an all-zero output has "
            "error 1); keep more tokens or use another method"
        )
    return rows
