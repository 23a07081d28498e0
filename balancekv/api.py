"""``balancekv.compress`` and ``balancekv.attention`` (SPEC section 8).

``compress`` validates its input, moves it to NumPy float64 with the leading
dims flattened into one head axis, asks the chosen method for its compressed
segments, measures the result on probe queries, and returns a
:class:`~balancekv.CompressedKV` in the caller's kind (NumPy, or torch on the
caller's device).

Three ways to set the budget:

- ``keep``: the kept fraction of tokens, one level for every head;
- ``eps`` with ``guarantee="empirical"`` (default): per head, the most
  compressed level whose mean relative error on the probe queries is at most
  ``eps``; a head that meets ``eps`` at no level is stored exactly;
- ``eps`` with ``guarantee="theorem"``: the level the method's theorem
  certifies (constants in ``proofs/``); exact if the theorem needs every token.

Randomness: one seed (drawn and recorded when not given) determines
everything. Each level gets its own generator derived from the seed and the
level's description, so ``keep`` and ``eps`` modes build identical caches at
the same level.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from balancekv.reference import softmax_attention as ra

from . import _validate as V_
from ._arrays import Kind, to_numpy
from .compressed import BACKENDS, CompressedKV
from .methods import get_method
from .methods.base import Built, Context
from .storage import DenseStore, Segment, compact_dense, exact_segment

GUARANTEES = ("empirical", "theorem")
MAX_PROBES = 64


def level_rng(entropy: int, method: str, level: dict | None) -> np.random.Generator:
    """The generator for one level: a function of the seed, the method and the level only."""
    tag = zlib.crc32(f"{method}:{sorted((level or {}).items())!r}".encode())
    return np.random.default_rng([int(entropy), tag])


def segments_attention(segments: list[Segment], Q: np.ndarray, scale: float) -> np.ndarray:
    """The estimator of SPEC section 1 over NumPy segments (reference path)."""
    cat = lambda f, ax: np.concatenate([np.asarray(to_numpy(f(s))) for s in segments], axis=ax)
    return ra.weighted_attention(
        Q,
        cat(lambda s: s.keys.dense(), -2),
        cat(lambda s: s.values.dense(), -2),
        cat(lambda s: s.num_logw, -1),
        cat(lambda s: s.den_logw, -1),
        scale,
    )


def per_head_error(segments, probes, exact, scale) -> np.ndarray:
    """Mean over probe queries of ``||z(q) - Attn(q)|| / ||Attn(q)||``, per head."""
    z = segments_attention(segments, probes, scale)
    return ra.relative_error(z, exact).mean(axis=-1)


class PerHeadStream:
    """Decode-time state when heads chose different levels: each level's stream serves its heads."""

    def __init__(self, parts):
        self.parts = parts  # list of (head mask, stream or None, segments)

    def append(self, k, v, pos):
        out = []
        for i, (mask, stream, segs) in enumerate(self.parts):
            if stream is not None:
                segs = stream.append(k, v, pos)
                self.parts[i] = (mask, stream, segs)
            out.extend(s.masked(mask) for s in segs)
        out.append(exact_segment(k.copy(), v.copy(), pos, "appended").masked(self.exact_tail_mask))
        return out

    @property
    def exact_tail_mask(self):
        streamed = np.zeros_like(self.parts[0][0])
        for mask, stream, _ in self.parts:
            if stream is not None:
                streamed |= mask
        return ~streamed


def _combine(builts: list[Built], choice: np.ndarray) -> tuple[list[Segment], Any]:
    """Per head ``h``, the segments of ``builts[choice[h]]``; unchosen heads become padding."""
    used = sorted(set(choice.tolist()))
    if len(used) == 1:
        b = builts[used[0]]
        return b.segments, b.stream
    parts = [(choice == u, builts[u].stream, builts[u].segments) for u in used]
    segs = [s.masked(mask) for mask, _, ss in parts for s in ss]
    if all(isinstance(s.keys, DenseStore) and isinstance(s.values, DenseStore) for s in segs):
        segs = [compact_dense(segs, "mixed")]
    stream = PerHeadStream(parts) if any(st is not None for _, st, _ in parts) else None
    return segs, stream


def compress(
    K,
    V,
    eps: float | None = None,
    *,
    keep: float | None = None,
    method: str = "balance",
    queries=None,
    guarantee: str = "empirical",
    delta: float = 0.01,
    scale: float | None = None,
    seed: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    **options,
) -> CompressedKV:
    """Compress keys ``K (…, n, d)`` and values ``V (…, n, s)`` into a :class:`CompressedKV`.

    Parameters
    ----------
    eps : target mean relative attention error on the probe queries, in (0, 1).
    keep : fraction of tokens kept, in (0, 1]. Give exactly one of ``eps`` and ``keep``.
    method : a name from :func:`balancekv.methods.available_methods`.
    queries : probe queries ``(…, p, d)`` (e.g. the prompt's last queries); default: the last
        ``min(64, n)`` keys. Query-aware methods (SnapKV) also use them for scoring.
    guarantee : ``"empirical"`` (measure on probes) or ``"theorem"`` (budget from the method's
        theorem, constants in ``proofs/``).
    delta : failure probability for theorem budgets and walk thresholds.
    scale : logit scale, default ``1/sqrt(d)``.
    seed : makes the result reproducible; drawn (and recorded in ``diagnostics``) if ``None``.
    backend : ``"auto"``, ``"reference"`` (NumPy), ``"torch"`` or ``"triton"``.
    progress : show a progress bar over levels of the ``eps`` search.
    **options : the method's options (see ``get_method(method).defaults``).
    """
    V_.check_kv(K, V)
    if (eps is None) == (keep is None):
        raise ValueError("give exactly one of eps (target error) and keep (kept fraction)")
    if eps is not None:
        eps = V_.check_open_unit("eps", eps)
    if keep is not None:
        keep = V_.check_open_unit("keep", keep, closed_right=True)
    V_.check_choice("guarantee", guarantee, GUARANTEES)
    V_.check_choice("backend", backend, BACKENDS)
    delta = V_.check_open_unit("delta", delta)
    V_.check_scale(scale)
    V_.check_seed(seed)
    meth = get_method(method)
    opts = meth.resolve_options(options)
    lead, (n, d), s = tuple(K.shape[:-2]), tuple(K.shape[-2:]), int(V.shape[-1])
    H = int(np.prod(lead, dtype=np.int64))
    if queries is not None:
        V_.check_queries("queries", queries, lead, d, like=K)
    if keep is not None and keep < 1 and not meth.selects_tokens:
        raise ValueError(f"method {method!r} keeps every token; keep must be 1 (use eps or its options)")
    kind = Kind.of(K)
    Kn, Vn = to_numpy(K).reshape(H, n, d), to_numpy(V).reshape(H, n, s)
    scale = ra.default_scale(d, scale)
    if queries is not None:
        probes = to_numpy(queries).reshape(H, -1, d)
    else:
        probes = Kn[:, -min(MAX_PROBES, n) :]
    entropy = int(seed) if seed is not None else int(np.random.SeedSequence().entropy)
    exact_probe = ra.attention(probes, Kn, Vn, scale)
    # auto: Triton for CUDA tensors, torch for CPU tensors, the NumPy reference for NumPy input
    method_backend = backend
    if backend == "auto":
        method_backend = (
            ("triton" if str(kind.device).startswith("cuda") else "torch") if kind.is_torch else "reference"
        )

    def build(level):
        ctx = Context(
            scale=scale,
            rng=level_rng(entropy, method, level),
            probes=probes,
            delta=delta,
            opts=opts,
            queries_given=queries is not None,
            backend=method_backend,
        )
        if level is None:
            return Built([exact_segment(Kn.copy(), Vn.copy(), np.arange(n))], info={"exact": True})
        return meth.build(Kn, Vn, level, ctx)

    diag: dict[str, Any] = {
        "method": method,
        "options": dict(opts),
        "seed": entropy,
        "eps": eps,
        "keep": keep,
        "guarantee": guarantee,
        "probes": int(probes.shape[-2]),
        "queries_given": queries is not None,
    }
    if keep is not None or guarantee == "theorem":
        if keep is not None:
            level = meth.level_for_keep(keep, n, opts)
        else:
            ctx = Context(scale=scale, rng=level_rng(entropy, method, None), probes=probes, delta=delta, opts=opts)
            level = meth.theorem_level(Kn, Vn, eps, ctx)
            diag["theorem_exact"] = level is None
        built = build(level)
        levels, choice = [level], np.zeros(H, dtype=int)
        errors = per_head_error(built.segments, probes, exact_probe, scale)
        segs, stream, infos = built.segments, built.stream, [built.info]
    else:
        levels = [None] + meth.levels(n, opts)  # index 0: the exact fallback
        builts, errs = [], []
        iterator = levels
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            iterator = tqdm(levels, desc=f"compress[{method}] levels")
        for level in iterator:
            b = build(level)
            builts.append(b)
            errs.append(per_head_error(b.segments, probes, exact_probe, scale))
        errs = np.stack(errs)  # (levels, H)
        ok = errs <= eps
        idx = np.arange(len(levels))[:, None]
        choice = np.where(ok, idx, 0).max(axis=0)  # most compressed level meeting eps (0 = exact)
        errors = errs[choice, np.arange(H)]
        segs, stream = _combine(builts, choice)
        infos = [b.info for b in builts]
    diag.update(
        {
            "levels": levels,
            "level_per_head": choice.reshape(lead),
            "error_per_head": errors.reshape(lead),
            "error": float(errors.mean()),
            "level_info": infos,
            "retries": int(sum(i.get("retries", 0) for i in infos)),
            "fallbacks": int(sum(i.get("fallbacks", 0) for i in infos)),
        }
    )
    if stream is not None:
        stream = _LeadStream(stream, lead)
    out_segments = [sg.reshape_lead(lead).to_kind(kind) for sg in segs]
    return CompressedKV(
        out_segments,
        lead=lead,
        d=d,
        s=s,
        n_seen=n,
        scale=scale,
        kind=kind,
        method=method,
        diagnostics=diag,
        stream=stream,
    )


class _LeadStream:
    """Adapts a method's ``(H, …)`` stream to the cache's leading dims."""

    def __init__(self, stream, lead):
        self.stream, self.lead = stream, tuple(lead)

    def append(self, k, v, pos):
        H = int(np.prod(self.lead, dtype=np.int64))
        segs = self.stream.append(k.reshape(H, *k.shape[-2:]), v.reshape(H, *v.shape[-2:]), pos)
        return [sg.reshape_lead(self.lead) for sg in segs]


def attention(Q, K, V, scale: float | None = None, causal: bool = False, backend: str = "auto"):
    """Exact softmax attention ``softmax(scale * Q K^T) V`` with stable exponentials.

    ``Q (…, m, d)``, ``K (…, n, d)``, ``V (…, n, s)`` with equal leading dims; ``causal``
    aligns the last query with the last key. NumPy in, NumPy out; torch in, torch out.
    """
    V_.check_kv(K, V)
    V_.check_queries("Q", Q, tuple(K.shape[:-2]), K.shape[-1], like=K)
    V_.check_scale(scale)
    V_.check_choice("backend", backend, BACKENDS)
    kind = Kind.of(Q)
    if backend in ("torch", "triton") or (backend == "auto" and kind.is_torch):
        import torch  # noqa: PLC0415

        from balancekv.fast import softmax_attention as fa  # noqa: PLC0415

        args = [x if kind.is_torch else torch.from_numpy(np.ascontiguousarray(x)) for x in (Q, K, V)]
        out = fa.attention(*args, scale=scale, causal=causal)
        return out.to(Q.dtype) if kind.is_torch else out.numpy()
    out = ra.attention(to_numpy(Q), to_numpy(K), to_numpy(V), scale, causal=causal)
    return kind.wrap(out, dtype=Q.dtype) if kind.is_torch else out.astype(np.result_type(Q.dtype, np.float32))
