"""``snapkv``: SnapKV selection [SNAP, arXiv 2404.14469] (SPEC section 7).

Per head, the last ``window`` probe queries form the observation window; prefix
positions are scored by their pooled attention from that window
(:func:`balancekv.reference.selection.snapkv_scores`), and the cache keeps the
top ``m - w`` of them plus the window's own ``w = min(window, m, probes)``
tokens, exactly (log-weight 0).

Queries: SnapKV needs the prompt's last queries. ``compress`` passes its probe
queries (``ctx.probes``): the caller's ``queries`` when given (taken as the last
prompt queries, aligned to the end of the cache), otherwise the last
``min(64, n)`` keys standing in for queries. Decode tokens are appended exactly.
"""

from __future__ import annotations

from balancekv.reference.selection import POOLS, select_top, snapkv_scores

from .base import Built, Method, check_int_option, kept_count
from .h2o import selected_segment


class SnapKV(Method):
    name = "snapkv"
    defaults = {"window": 32, "kernel": 7, "pool": "max"}

    def check_options(self, opts):
        check_int_option(opts, "window", 1)
        check_int_option(opts, "kernel", 1)
        if opts["kernel"] % 2 == 0:
            raise ValueError(f"option kernel must be odd (same-length pooling), got {opts['kernel']}")
        if opts["pool"] not in POOLS:
            raise ValueError(f"option pool must be one of {POOLS}, got {opts['pool']!r}")

    def build_reference(self, K, V, level, ctx):
        n = K.shape[-2]
        m = kept_count(level["keep"], n)
        w = min(ctx.opts["window"], m, ctx.probes.shape[-2])
        scores = snapkv_scores(ctx.probes, K, ctx.scale, window=w, kernel=ctx.opts["kernel"], pool=ctx.opts["pool"])
        idx = select_top(scores, m, w)
        return Built([selected_segment(K, V, idx, "snapkv")], info={"kept": m, "window": w})
