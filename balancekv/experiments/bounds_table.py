"""``balancekv reproduce bounds``: one row per theorem in ``proofs/`` — bound vs worst observed value.

Each row comes from a :class:`BoundCheck`: a name, the source (paper and
theorem, and the ``proofs/`` file), the bound function in
:mod:`balancekv.bounds` it exercises, and a function ``run(seed)`` that builds
one seeded instance and returns ``(observed, bound)`` arrays of the same shape
(every element one inequality ``observed <= bound`` the theorem asserts, for a
deterministic theorem; with probability at least ``1 - delta`` each, for a
probabilistic one). The table reports, over all instances and elements, the
worst ratio ``observed / bound`` with the observed value and the bound where it
occurs. A ratio at most 1 means the bound held everywhere; the size of the
ratio says how tight it is.

Adding a check (one function, one decorator)::

    @bound_check("walk-discrepancy", source="[ALS] Thm 1.1; proofs/walk.md",
                 bound="balancekv.bounds.walk.<function>", probabilistic=True)
    def _walk(seed: int):
        ...build a seeded instance, call the bound function once...
        return observed, bound

A check whose bound function does not exist (yet) is listed as "unavailable"
instead of failing: the table stays runnable while bounds land one by one.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class BoundCheck:
    name: str
    source: str
    bound: str  # dotted path of the bound function in balancekv.bounds
    run: Callable[[int], tuple]
    probabilistic: bool = False
    note: str = ""

    def available(self) -> bool:
        module, _, fn = self.bound.rpartition(".")
        try:
            return hasattr(importlib.import_module(module), fn)
        except ImportError:
            return False


CHECKS: list[BoundCheck] = []


def bound_check(name: str, *, source: str, bound: str, probabilistic: bool = False, note: str = ""):
    """Register ``run(seed) -> (observed, bound)`` as the check called ``name``."""

    def deco(fn):
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"a bound check named {name!r} is already registered")
        CHECKS.append(BoundCheck(name, source, bound, fn, probabilistic, note))
        return fn

    return deco


def _fn(path: str):
    module, _, fn = path.rpartition(".")
    return getattr(importlib.import_module(module), fn)


def evaluate(check: BoundCheck, seeds=range(3)) -> dict:
    """Run ``check`` on each seed; the worst ``observed / bound`` over all instances and elements."""
    row = {
        "name": check.name,
        "source": check.source,
        "bound_fn": check.bound,
        "probabilistic": check.probabilistic,
        "note": check.note,
    }
    if not check.available():
        row["status"] = "unavailable"
        return row
    worst = None
    count = 0
    for seed in seeds:
        obs, bnd = check.run(int(seed))
        obs, bnd = np.broadcast_arrays(np.asarray(obs, np.float64), np.asarray(bnd, np.float64))
        if not (np.all(np.isfinite(obs)) and np.all(bnd > 0)):
            raise FloatingPointError(
                f"check {check.name!r} (seed {seed}) returned non-finite values or a non-positive bound"
            )
        ratio = obs / bnd
        i = int(np.argmax(ratio))
        count += ratio.size
        if worst is None or ratio.flat[i] > worst[0]:
            worst = (float(ratio.flat[i]), float(obs.flat[i]), float(bnd.flat[i]), int(seed))
    row.update(
        status="held" if worst[0] <= 1 else "VIOLATED",
        ratio=worst[0],
        observed=worst[1],
        bound=worst[2],
        worst_seed=worst[3],
        instances=count,
    )
    return row


def run_bounds(only=None, seeds=range(3), progress: bool = True) -> list[dict]:
    """Evaluate every registered check (or those named in ``only``)."""
    checks = CHECKS if only is None else [c for c in CHECKS if c.name in set(only)]
    if only is not None:
        unknown = set(only) - {c.name for c in CHECKS}
        if unknown:
            raise ValueError(f"unknown bound check(s) {sorted(unknown)}; available: {[c.name for c in CHECKS]}")
    it = checks
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        it = tqdm(checks, desc="bounds", unit="check")
    return [evaluate(c, seeds) for c in it]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| theorem | source | bound function | worst observed | bound there | observed / bound | "
        "inequalities checked | status |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        fn = f"`{r['bound_fn'].replace('balancekv.bounds.', '')}`"
        if r["status"] == "unavailable":
            lines.append(f"| {r['name']} | {r['source']} | {fn} | | | | | not implemented yet |")
            continue
        status = r["status"] + (" (probabilistic)" if r["probabilistic"] else "")
        lines.append(
            f"| {r['name']} | {r['source']} | {fn} | {r['observed']:.4g} | {r['bound']:.4g} | "
            f"{r['ratio']:.3g} | {r['instances']} | {status} |"
        )
    notes = [f"- **{r['name']}**: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def main(args) -> int:
    """Entry point of ``balancekv reproduce bounds``."""
    rows = run_bounds(only=args.only, seeds=range(args.seeds), progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "bounds.md"
    cmd = "balancekv " + " ".join(getattr(args, "argv", None) or ["reproduce", "bounds"])
    md.write_text(
        "# Bounds against observed values\n\nOne row per theorem in `proofs/`: the worst ratio "
        f"observed / bound over {args.seeds} seeded instances of each check "
        "(every element of an instance is one inequality).\n\n"
        f"Command: `{cmd}`\n\n" + markdown_table(rows)
    )
    (out / "bounds.json").write_text(json.dumps(rows, indent=1))
    print(md.read_text())
    print(f"wrote {md}")
    return 0 if all(r["status"] != "VIOLATED" or r["probabilistic"] for r in rows) else 1


# ====================================================================== the checks
def _kv_like_llm(seed: int, n: int = 256, d: int = 64):
    from balancekv.synthetic import make_kv  # noqa: PLC0415

    K, V, Q = make_kv("llm", heads=2, n=n, d=d, q=16, seed=seed)
    return K, V, Q


@bound_check(
    "Q1 element error",
    source="[KIVI] 2-bit groups; proofs/quantization.md Thm Q1",
    bound="balancekv.bounds.quantization.element_error_bound",
)
def _q1(seed: int):
    from balancekv.bounds.quantization import element_error_bound  # noqa: PLC0415
    from balancekv.reference.quantization import dequantize, quantize  # noqa: PLC0415

    K, _, _ = _kv_like_llm(seed)
    obs, bnd = [], []
    for bits in (2, 4, 8):
        codes, s, z = quantize(K, bits, 32, axis=-2)
        obs.append(np.abs(K - dequantize(codes, s, z, 32, axis=-2)))
        bnd.append(element_error_bound(K, s, z, bits, 32, axis=-2))
    return np.stack(obs), np.stack(bnd)


def _quantized_keys(K, bits=2, group=32):
    from balancekv.bounds.quantization import element_error_bound  # noqa: PLC0415
    from balancekv.reference.quantization import dequantize, quantize  # noqa: PLC0415

    codes, s, z = quantize(K, bits, group, axis=-2)
    return dequantize(codes, s, z, group, axis=-2), element_error_bound(K, s, z, bits, group, axis=-2)


@bound_check(
    "Q2 logit error",
    source="[KIVI]; proofs/quantization.md Thm Q2",
    bound="balancekv.bounds.quantization.logit_error_bound",
)
def _q2(seed: int):
    from balancekv.bounds.quantization import logit_error_bound  # noqa: PLC0415

    K, _, Q = _kv_like_llm(seed)
    scale = 1 / np.sqrt(K.shape[-1])
    Kh, e = _quantized_keys(K)
    obs = np.abs(scale * np.einsum("hqd,hnd->hqn", Q, K - Kh))
    bnd = np.stack(
        [np.stack([logit_error_bound(Q[h, j], e[h], scale) for j in range(Q.shape[1])]) for h in range(Q.shape[0])]
    )
    return obs, bnd


@bound_check(
    "Q3 attention error",
    source="[KIVI]/[MINI]; proofs/quantization.md Thm Q3",
    bound="balancekv.bounds.quantization.attention_error_bound",
    note="keys 2-bit per channel and values 2-bit per token (KIVI's arrangement), groups of 32",
)
def _q3(seed: int):
    from balancekv.bounds.quantization import attention_error_bound, logit_error_bound  # noqa: PLC0415
    from balancekv.reference.quantization import dequantize, quantize  # noqa: PLC0415
    from balancekv.reference.softmax_attention import attention  # noqa: PLC0415

    K, V, Q = _kv_like_llm(seed)
    scale = 1 / np.sqrt(K.shape[-1])
    Kh, e = _quantized_keys(K)
    codes, s, z = quantize(V, 2, 32, axis=-1)
    Vh = dequantize(codes, s, z, 32, axis=-1)
    err = np.linalg.norm(attention(Q, Kh, Vh, scale) - attention(Q, K, V, scale), axis=-1)  # (h, q)
    bnd = np.empty_like(err)
    for h in range(Q.shape[0]):
        vhat = np.linalg.norm(Vh[h], axis=-1).max()
        verr = np.linalg.norm(V[h] - Vh[h], axis=-1).max()
        for j in range(Q.shape[1]):
            bnd[h, j] = attention_error_bound(logit_error_bound(Q[h, j], e[h], scale).max(), vhat, verr)
    return err, bnd


@bound_check(
    "SubGen attention error",
    source="[SUB] Thm 2.4; proofs/subgen.md",
    bound="balancekv.bounds.subgen.subgen_theorem_rhs",
    probabilistic=True,
    note="offline SubGen on clustered keys with (t, s_num) from subgen_sample_sizes(eps=0.5, "
    "delta=0.1): each query may exceed eps ||softmax||_2 ||V||_op with probability <= 0.1",
)
def _subgen(seed: int):
    from balancekv.api import segments_attention  # noqa: PLC0415
    from balancekv.bounds.subgen import stable_rank, subgen_sample_sizes, subgen_theorem_rhs  # noqa: PLC0415
    from balancekv.methods.subgen import state_segments  # noqa: PLC0415
    from balancekv.reference.softmax_attention import attention  # noqa: PLC0415
    from balancekv.reference.subgen import fold_scale, greedy_k_center, subgen_offline  # noqa: PLC0415
    from balancekv.synthetic import make_kv  # noqa: PLC0415

    eps, delta, m = 0.5, 0.1, 8
    K, V, Q = make_kv("clustered", heads=1, n=512, d=16, q=16, seed=seed, clusters=m, radius=0.05)
    scale = 1 / np.sqrt(K.shape[-1])
    _, _, dist = greedy_k_center(fold_scale(K[0], scale), m)
    r = float(np.linalg.norm(Q[0], axis=-1).max())
    t, s = subgen_sample_sizes(eps, r, float(dist.max()), m, stable_rank(V[0]), delta)
    state = subgen_offline(K, V, t=int(t), s_num=int(s), m=m, scale=scale, rng=np.random.default_rng(seed))
    z = segments_attention(state_segments(state), Q, scale)
    obs = np.linalg.norm(z - attention(Q, K, V, scale), axis=-1)[0]
    return obs, subgen_theorem_rhs(Q[0], K[0], V[0], eps, scale)


@bound_check(
    "ALS walk, fixed direction",
    source="[ALS] §2; proofs/self_balancing_walk.md",
    bound="balancekv.bounds.walk.als_direction_bound",
    probabilistic=True,
    note="n=512 random unit vectors in R^16, c = 30 log(n/delta), delta=0.01; |<w_n, t>| for 16 fixed "
    "unit directions t; each may exceed the bound with probability <= delta",
)
def _als(seed: int):
    from balancekv.bounds.walk import als_direction_bound, als_threshold  # noqa: PLC0415
    from balancekv.reference.walk import self_balancing_walk  # noqa: PLC0415

    rng = np.random.default_rng([seed, 7])
    n, D, delta = 512, 16, 0.01
    U = rng.normal(size=(n, D))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    c = als_threshold(n, delta)
    x = self_balancing_walk(U, rng.random(n), c=c)
    T = rng.normal(size=(16, D))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    obs = np.abs(T @ (x @ U))
    return obs, np.full(obs.shape, als_direction_bound(c, delta))


@bound_check(
    "SoftmaxBalance discrepancy (Thm 3.3)",
    source="[BKV] Thm 3.3; proofs/softmax_balance.md",
    bound="balancekv.bounds.balance.softmax_balance_bound",
    probabilistic=True,
    note="one halving of n=256 bounded-norm tokens (d=s=16), 16 random queries; numerator "
    "discrepancy ||2 sum_C' e^a v - sum e^a v|| against the bound at delta=0.01",
)
def _softmax_balance(seed: int):
    from balancekv.bounds.balance import softmax_balance_bound  # noqa: PLC0415
    from balancekv.bounds.walk import als_threshold  # noqa: PLC0415
    from balancekv.reference.softmax_balance import softmax_balance  # noqa: PLC0415
    from balancekv.synthetic import make_kv  # noqa: PLC0415

    K, V, Q = make_kv("bounded", heads=1, n=256, d=16, q=16, seed=seed)
    K, V, Q = K[0], V[0], Q[0]
    scale, delta = 1 / np.sqrt(16), 0.01
    c = als_threshold(256, delta)
    half = softmax_balance(K, V, np.random.default_rng([seed, 3]).random(256), scale=scale, c=c, delta=delta)
    e = np.exp(scale * Q @ K.T)  # (q, n)
    w = np.zeros(256)
    w[half.indices] = 2.0
    obs = np.linalg.norm((e * w) @ V - e @ V, axis=-1)
    r_k, r_v = np.linalg.norm(K, axis=1).max(), np.linalg.norm(V, axis=1).max()
    bnd = np.array([softmax_balance_bound(V.shape[1], float(np.linalg.norm(q)), r_k, r_v, scale, c, delta) for q in Q])
    return obs, bnd


@bound_check(
    "MergeAndReduce memory",
    source="[BKV] Alg. 1, Thm 3.1; proofs/merge_and_reduce.md",
    bound="balancekv.bounds.balance.merge_reduce_memory_bound",
    note="one instance, t=16, a stream of 1000 bounded-norm tokens (d=s=8); tokens held after every "
    "step against t (2 + floor(log2(n/t))) — deterministic while no walk falls back",
)
def _merge_reduce_memory(seed: int):
    from balancekv.bounds.balance import merge_reduce_memory_bound  # noqa: PLC0415
    from balancekv.reference.merge_reduce import MergeAndReduce  # noqa: PLC0415
    from balancekv.synthetic import make_kv  # noqa: PLC0415

    K, V, _ = make_kv("bounded", heads=1, n=1000, d=8, seed=seed)
    mr = MergeAndReduce(16, 8, 8, scale=1 / np.sqrt(8), rng=np.random.default_rng(seed))
    obs, bnd = [], []
    for i in range(1000):
        mr.add(K[0, i], V[0, i], i)
        obs.append(mr.size)
        bnd.append(merge_reduce_memory_bound(i + 1, 16))
    return np.array(obs, float), np.array(bnd, float)
