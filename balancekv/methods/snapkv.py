"""``snapkv``: SnapKV selection [SNAP, arXiv 2404.14469] (SPEC section 7).

Per head, the last ``window`` probe queries form the observation window; prefix
positions are scored by their pooled attention from that window
(:func:`balancekv.reference.selection.snapkv_scores`), and the cache keeps the
top ``m - w`` of them plus the window's own ``w = min(window, m, probes, n)``
tokens, exactly (log-weight 0).

Queries: SnapKV needs the prompt's last queries. ``compress`` passes its probe
queries (``ctx.probes``): the caller's ``queries`` when given (taken as the last
prompt queries, aligned to the end of the cache; with more queries than keys the
last ``n``), otherwise the last ``min(64, n)`` keys standing in for queries.
Decode tokens are appended exactly.

Both paths: the NumPy reference, and torch on the caller's device
(:func:`balancekv.fast.selection.snapkv_scores`, Triton column sums on CUDA; the
reference's stable tie-breaking in ``select_top``).
"""

from __future__ import annotations

from balancekv.reference import selection as rs

from .._arrays import is_torch
from .base import Built, Method, check_int_option, kept_count
from .h2o import check_sink_option, scoring_queries, select_top, selected_segment, shared_memo, sink_count

POOLS = rs.POOLS


class SnapKV(Method):
    name = "snapkv"
    defaults = {"window": 32, "kernel": 7, "pool": "max", "sink": "auto"}

    def check_options(self, opts):
        check_int_option(opts, "window", 1)
        check_int_option(opts, "kernel", 1)
        if opts["kernel"] % 2 == 0:
            raise ValueError(f"option kernel must be odd (same-length pooling), got {opts['kernel']}")
        if opts["pool"] not in POOLS:
            raise ValueError(f"option pool must be one of {POOLS}, got {opts['pool']!r}")
        check_sink_option(opts)

    def uses_queries(self, opts, queries_given):
        return True  # scores with the probes (the queries, or the last keys standing in for them)

    def _build(self, K, V, level, ctx):
        n = K.shape[-2]
        m = kept_count(level["keep"], n)
        Q = scoring_queries(ctx.probes, n)
        w = min(ctx.opts["window"], m, Q.shape[-2])
        args = dict(window=w, kernel=ctx.opts["kernel"], pool=ctx.opts["pool"])

        def compute():
            if is_torch(K):
                from balancekv.fast import selection as fs  # noqa: PLC0415  (torch path only)

                return fs.snapkv_scores(Q, K, ctx.scale, **args, backend=ctx.backend)
            return rs.snapkv_scores(Q, K, ctx.scale, **args)

        # the scores depend on the probes and the window only: the levels (and folds) of one call share them
        tag = ("snapkv_scores", float(ctx.scale), ctx.backend, tuple(sorted(args.items())))
        scores = compute() if ctx.shared is None else shared_memo(ctx.shared, tag, ctx.probes, K, compute)
        sink = sink_count(ctx)
        idx = select_top(scores, m, w, sink)
        return Built([selected_segment(K, V, idx, "snapkv")], info={"kept": m, "window": w, "sink": sink})

    build_reference = _build
    build_torch = _build
