"""Compress the middle of a cache and keep both ends exact ([BKV] Fig. 1 protocol).

[BKV] (arXiv 2502.07861, Sec. 5.1, single-layer approximation) keeps the first
and the last 256 tokens of a layer's cache exactly and compresses only the
tokens in between. :func:`compress_middle` does that for any registered
method: it calls :func:`balancekv.compress` on ``K[..., head:n - tail, :]`` and
concatenates ``[exact head] + [compressed middle] + [exact tail]`` into one
:class:`~balancekv.CompressedKV` (the segments keep their own storage, so
quantized middles stay quantized and ``nbytes`` stays honest). Slot positions
are shifted back to stream indices, so ``attend(Q, positions=…)`` is causal.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import balancekv
from balancekv._arrays import Kind, is_torch
from balancekv.compressed import CompressedKV
from balancekv.methods import get_method
from balancekv.storage import exact_segment

#: Options that keep tokens exact inside a method (attention sinks, recent window). In the middle-only
#: protocol the ends are already exact, so these are set to 0 wherever the method accepts 0.
EDGE_OPTIONS = ("sink", "window")


def middle_options(method: str, options: dict | None = None) -> dict:
    """``options`` plus ``sink=0``/``window=0`` for each of those the method has and accepts as 0."""
    meth = get_method(method)
    out = dict(options or {})
    for name in EDGE_OPTIONS:
        if name in meth.defaults and name not in out:
            try:
                meth.resolve_options({**out, name: 0})
            except (ValueError, TypeError):
                continue  # e.g. SnapKV's observation window must hold at least one query
            out[name] = 0
    return out


def compress_middle(
    K,
    V,
    *,
    method: str,
    keep: float = 1.0,
    head: int = 256,
    tail: int = 256,
    queries=None,
    scale: float | None = None,
    seed: int | None = 0,
    **options,
) -> CompressedKV:
    """``K (…, n, d)``, ``V (…, n, s)`` with tokens ``[head, n - tail)`` compressed by ``method`` at ``keep``.

    ``queries`` (optional ``(…, p, d)``) are passed to :func:`balancekv.compress` as
    probes (query-aware methods score with them; they should precede the tail).
    Methods that keep every token (quantization) are called with ``keep=1``.
    Options are passed through after :func:`middle_options`.
    """
    if (
        isinstance(head, bool)
        or isinstance(tail, bool)
        or not isinstance(head, (int, np.integer))
        or not isinstance(tail, (int, np.integer))
        or head < 0
        or tail < 0
    ):
        raise ValueError(f"head and tail must be non-negative ints, got head={head!r}, tail={tail!r}")
    n = K.shape[-2]
    if n - head - tail < 1:
        raise ValueError(f"the cache has n={n} tokens: nothing left to compress between head={head} and tail={tail}")
    meth = get_method(method)
    opts = middle_options(method, options)
    if not meth.selects_tokens:
        keep = 1.0
    mid = balancekv.compress(
        K[..., head : n - tail, :],
        V[..., head : n - tail, :],
        keep=keep,
        method=method,
        queries=queries,
        scale=scale,
        seed=seed,
        **opts,
    )
    own = lambda x: x.clone() if is_torch(x) else np.array(x, copy=True)  # never hold the caller's memory
    segments = []
    if head:
        segments.append(exact_segment(own(K[..., :head, :]), own(V[..., :head, :]), np.arange(head), "head"))
    for seg in mid.segments:
        segments.append(replace(seg, positions=np.where(seg.positions >= 0, seg.positions + head, -1)))
    if tail:
        segments.append(
            exact_segment(own(K[..., n - tail :, :]), own(V[..., n - tail :, :]), np.arange(n - tail, n), "tail")
        )
    diag = dict(mid.diagnostics, middle=(head, n - tail), middle_options=opts)
    return CompressedKV(
        segments,
        lead=tuple(K.shape[:-2]),
        d=K.shape[-1],
        s=V.shape[-1],
        n_seen=n,
        scale=mid.scale,
        kind=Kind.of(K),
        method=f"{method}[middle]",
        diagnostics=diag,
    )
