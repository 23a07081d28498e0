"""``h2o``: Heavy-Hitter Oracle eviction [H2O, arXiv 2306.14048] (SPEC section 7).

Keeps, per head, the ``heavy`` positions with the largest accumulated attention
(:func:`balancekv.reference.selection.h2o_scores`) outside the recent window,
plus the last ``recent`` tokens, all exactly (log-weight 0; evicted tokens are
gone, so the estimate is biased towards the kept ones). With a kept fraction
``keep``, ``recent = round(recent_share * m)`` of the ``m = keep * n`` slots go to
the recent window (H2O and MiniKV split the budget evenly: ``recent_share = 0.5``).

Queries: H2O sums attention over *all* prompt queries. ``compress`` only sees
``queries`` when the caller passes them (then they are taken as the last prompt
queries, aligned to the end of the cache); otherwise every key stands in for
its own query (the full causal self-attention of ``K``), a proxy we document
rather than hide. Heavy hitters are chosen once here and persist through
decoding; decode tokens are appended exactly.
"""

from __future__ import annotations

import numpy as np

from balancekv.reference.selection import h2o_scores, select_top

from ..storage import exact_segment, gather_tokens
from .base import Built, Method, check_float_option, kept_count


def selection_queries(K: np.ndarray, ctx) -> np.ndarray:
    """The queries H2O scores with: the caller's ``queries`` if given, else the keys themselves."""
    return ctx.probes if ctx.queries_given else K


def selected_segment(K, V, idx, label):
    """The tokens ``idx (H, m)`` kept exactly, at their stream positions."""
    return exact_segment(gather_tokens(K, idx), gather_tokens(V, idx), idx, label)


class H2O(Method):
    name = "h2o"
    defaults = {"recent_share": 0.5}

    def check_options(self, opts):
        check_float_option(opts, "recent_share", 0.0, 1.0)

    def build_reference(self, K, V, level, ctx):
        n = K.shape[-2]
        m = kept_count(level["keep"], n)
        recent = min(m, int(round(ctx.opts["recent_share"] * m)))
        scores = h2o_scores(selection_queries(K, ctx), K, ctx.scale)
        idx = select_top(scores, m, recent)
        return Built([selected_segment(K, V, idx, "h2o")], info={"kept": m, "recent": recent})
