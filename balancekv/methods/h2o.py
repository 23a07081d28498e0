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
rather than hide. More queries than keys (a one-token prompt whose probes stack
several query heads, issue 15 item 6) cannot all sit at the end of the cache:
the last ``n`` score. Heavy hitters are chosen once here and persist through
decoding; decode tokens are appended exactly.

Both paths: NumPy float64 (the reference scorer and ``select_top``) and torch on
the caller's device (:mod:`balancekv.fast.selection`: torch blocks on CPU, the
two-pass Triton scorer on CUDA; the same stable tie-breaking, so float64 builds
keep the reference's tokens). Scoring without queries is blocked (``O(n * block)``
memory, never ``n x n``) and done once per ``compress`` call: the ``eps`` search
builds every level from the same working arrays, and :func:`h2o_scores_once`
remembers the scores of the last ``(queries, keys)`` pair while the keys live.
"""

from __future__ import annotations

import threading
import weakref

from balancekv.reference import selection as rs

from .._arrays import is_torch
from ..storage import exact_segment, gather_tokens
from .base import Built, Method, check_float_option, kept_count


def scoring_queries(Q, n: int):
    """``Q``'s last ``n`` queries when it holds more than the ``n`` keys (they align to the cache's end)."""
    return Q[..., -n:, :] if Q.shape[-2] > n else Q


def selection_queries(K, ctx):
    """The queries H2O scores with: the caller's ``queries`` if given (the last ``n``), else the keys themselves."""
    return scoring_queries(ctx.probes, K.shape[-2]) if ctx.queries_given else K


class _ScoreMemo:
    """The H2O scores of the last ``(Q source, K)`` pair scored, dropped when ``K`` is collected.

    Identity (not value) of the working arrays is the key: ``compress`` hands every level of one
    call the same ``K`` and probe objects, and a new call has new ones. A race between threads
    only costs a recomputation.
    """

    def __init__(self):
        self.entry = None
        self.lock = threading.Lock()

    def _drop(self, ref):
        with self.lock:
            if self.entry is not None and self.entry[0] is ref:
                self.entry = None

    def get(self, Qsrc, K, key, compute):
        e = self.entry
        if e is not None and e[0]() is K and e[1]() is Qsrc and e[2] == key:
            return e[3]
        scores = compute()
        with self.lock:
            self.entry = (weakref.ref(K, self._drop), weakref.ref(Qsrc), key, scores)
        return scores


_MEMO = _ScoreMemo()


def h2o_scores_once(K, ctx):
    """H2O scores ``(H, n)`` of ``K`` with :func:`selection_queries`, on ``K``'s path, once per ``compress``."""
    Qsrc = ctx.probes if ctx.queries_given else K

    def compute():
        Q = scoring_queries(Qsrc, K.shape[-2])
        if is_torch(K):
            from balancekv.fast import selection as fs  # noqa: PLC0415  (torch path only)

            return fs.h2o_scores(Q, K, ctx.scale, backend=ctx.backend)
        return rs.h2o_scores(Q, K, ctx.scale)

    version = (K._version, Qsrc._version) if is_torch(K) else None  # in-place writes change it
    if ctx.shared is not None:  # one compress call's memo: every level and fold (each fold its own probes)
        return shared_memo(ctx.shared, ("h2o_scores", float(ctx.scale), ctx.backend, version), Qsrc, K, compute)
    return _MEMO.get(Qsrc, K, (float(ctx.scale), ctx.backend, version), compute)


def shared_memo(shared: dict, tag, Qsrc, K, compute):
    """``compute()`` once per ``(tag, Qsrc, K)`` in a compress call's ``ctx.shared`` (the objects are kept
    with the value, so their ids stay theirs)."""
    key = (tag, id(Qsrc), id(K))
    hit = shared.get(key)
    if hit is not None and hit[0] is Qsrc and hit[1] is K:
        return hit[2]
    out = compute()
    shared[key] = (Qsrc, K, out)
    return out


def select_top(scores, budget: int, recent: int):
    """:func:`balancekv.reference.selection.select_top` on NumPy scores, its torch twin on tensors."""
    if is_torch(scores):
        from balancekv.fast import selection as fs  # noqa: PLC0415  (torch path only)

        return fs.select_top(scores, budget, recent)
    return rs.select_top(scores, budget, recent)


def selected_segment(K, V, idx, label):
    """The tokens ``idx (H, m)`` kept exactly, at their stream positions."""
    return exact_segment(gather_tokens(K, idx), gather_tokens(V, idx), idx, label)


class H2O(Method):
    name = "h2o"
    defaults = {"recent_share": 0.5}

    def check_options(self, opts):
        check_float_option(opts, "recent_share", 0.0, 1.0)

    def uses_queries(self, opts, queries_given):
        return queries_given  # without queries it scores with the keys themselves

    def _build(self, K, V, level, ctx):
        n = K.shape[-2]
        m = kept_count(level["keep"], n)
        recent = min(m, int(round(ctx.opts["recent_share"] * m)))
        idx = select_top(h2o_scores_once(K, ctx), m, recent)
        return Built([selected_segment(K, V, idx, "h2o")], info={"kept": m, "recent": recent})

    build_reference = _build
    build_torch = _build
