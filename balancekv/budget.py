"""Budget searches of :func:`balancekv.compress`: the validated ``eps`` rule and the byte budget ``ratio``.

Validated errors (issue 12, item 1). A method that chooses what to keep with the
probe queries (``Method.uses_queries``) is optimistic when judged on those same
queries. :func:`score` cross-fits: the ``p`` queries are split into ``folds``
contiguous folds (blocks of consecutive rows: with the queries in position order, each
fold is a stretch of positions, so a level is judged on queries earlier or later than
those that chose its tokens). Measured on SmolLM2 (``benchmarks/auto_vs_methods.py
--folds``: balance, snapkv, h2o at ratio 0.125 and 0.25, layers 1, 2, 5, 15, 29), the
validated error was 0.51 of the error on the 128 later queries with contiguous folds
and 0.42 with interleaved ones (query ``i`` in fold ``i mod folds``; neighbouring
positions and the query heads of one position then sit in both folds), against 0.40
for the in-sample error; so contiguous is the default (``FOLD_SCHEME``). Every level
is built once per fold with the other folds as its queries and
measured on the held-out fold, and a level's validated per-head error is the mean
over all held-out queries with its standard error ``std / sqrt(p)``. A level meets
``eps`` when ``margin * (validated + z * SE) <= eps``. Methods that do not select with the
probes keep the single in-sample evaluation (their probe error is already out of
selection), as does every method without queries (the probes are then fitted to the
keys, :func:`balancekv.api.no_query_probes`, and query-aware methods select with the last
keys).

Shift margin, gap check and choice (items 1 and 2). ``eps`` targets the queries that come next.
With queries the prediction for them is the larger of the validated error and the gap check
(:data:`MARGIN_GAP` x the error of the queries with the cache's last :func:`gap_tokens` tokens
hidden: the next queries read the cache from further away than the observed ones); the ``margin``
(:data:`MARGIN_QUERIES`, :data:`MARGIN_FITTED`, calibrated on the tuning text) scales it.
:func:`cheapest_meeting` stops at the first level, along its ladder (:func:`ladder_groups`), whose prediction fails, and
:func:`uniform_if_not_dearer` gives every head one level when the per-head mix would bill more bytes
(rare since mixes are held ragged).

Doing the work once (issue 11, item 2). :func:`eps_search` judges the levels least compressed first
along the method's ladders (:func:`level_chains`) and stops a ladder at the first level no head still on
it meets, building per step the final build of the current level with the validation builds of it and
of the next level, all at once (``Method.build_many``: the balance walks of every level and fold run in
lockstep, one sign loop per round; heavy-hitter scores, query logits and the exact probe attention are
computed once per call and a fold reads its columns). The cache returned at a level is the one ``keep``
mode builds there (same generator: :func:`balancekv.api.level_rng`, ``Method.rng_level``).

Byte budget (item 4). :func:`ratio_search` builds and bills every candidate as the
final cache (:attr:`CompressedKV.nbytes`, the caller's dtypes, weights, positions,
codes and stream state included) and keeps the largest one within
``ratio * input_nbytes``: a bisection on the kept token count for token-selecting
methods, the bits for ``quant``, both for ``minikv`` and ``balance+quant`` (the most
tokens at each of their bits, then the bits with the smallest validated error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Most builds :func:`score` asks ``Method.build_many`` for at once (balance: walks in lockstep).
LOCKSTEP_CHUNK = 8

#: How the queries are split into folds: ``"contiguous"`` (default) or ``"interleaved"``.
FOLD_SCHEME = "contiguous"

#: The ``eps`` rule (``compress(..., margin=None)``): a level qualifies when its *predicted* error on the next
#: queries is at most ``eps``. With observed queries the prediction is
#: ``margin * max(validated + z SE, MARGIN_GAP * gap error)``: the validated (cross-fitted) error, and the
#: *gap check*: the error of the observed queries when the last :data:`GAP_TOKENS` tokens of the cache are
#: hidden from the exact and the compressed attention alike. The observed queries are the latest ones and
#: attend most to the tokens just before them, which every method keeps exactly (the recent window); the next
#: queries see the same cache from further away, where it is compressed. On SmolLM2 the validated error was
#: about half the next-128 error with a tail of 20x on recency heads (layer 2, head 0: 0.015 against 0.33),
#: which no margin could cover below 0.45 of the cache's bytes; the gap error tracks it (0.155 there).
#: Without queries it is ``margin * (error on the probes fitted to the keys)``, which overestimates the next
#: queries' error on sink-dominated layers and underestimates it on others.
#:
#: Calibration (tuning text ``numpy-license`` only, five 2048-token windows at character offsets 0, 9000,
#: 18000, 27000, 36000; SmolLM2 layers 1, 2, 5, 15, 29; eps 0.05, 0.1, 0.2; ``balance`` and ``balance+quant``):
#: each default is the one with the fewest held bytes at eps 0.2 among those with which every one of those
#: cells had its error on the next 128 queries within 1.25 eps; ``GAP_TOKENS`` (32, 64, 96 or 128) likewise.
#: The report text ``python-docs`` then checks them (``benchmarks/auto_vs_methods.py --eps``;
#: ``benchmarks/README.md``, "eps on the next queries").
MARGIN_QUERIES = 1.0
MARGIN_GAP = 1.2
GAP_TOKENS = 128
MARGIN_FITTED = 0.6

#: What ``method="auto"`` and ``ratio=`` rank candidates by, with observed queries (:meth:`Scores.predicted`):
#: ``"max"`` the larger of the validated error and ``MARGIN_GAP`` x the gap check's, ``"gap"`` the gap check's alone.
#: Chosen on the tuning text ``numpy-license`` (``benchmarks/auto_vs_methods.py --text numpy-license --offset O
#: --auto-rank R``, three 2048-token windows at character offsets 0, 18000, 36000; 10 cells each): ``"gap"`` was never
#: worse than ``"max"`` and better in two windows (cells at the best single method's error: 9 / 8 / 8 against
#: 9 / 6 / 8; mean error at ratio 0.25 0.0628 and 0.0635 against 0.0667 and 0.0652 at offsets 18000 and 36000).
AUTO_RANK = "gap"


def _gap_rule(g: int) -> str:
    return f"; gap check: the queries with the last {g} tokens hidden x {MARGIN_GAP:g} <= eps"


def gap_tokens(n: int) -> int:
    """How many of the cache's last tokens the gap check hides: :data:`GAP_TOKENS`, at most a quarter of the
    cache (a shorter cache keeps three quarters visible; below 8 tokens there is no gap check, 0)."""
    g = min(GAP_TOKENS, int(n) // 4)
    return g if g >= 2 else 0


def default_margin(queries_given: bool) -> float:
    """The calibrated margin: :data:`MARGIN_QUERIES` with observed queries, :data:`MARGIN_FITTED` without."""
    return MARGIN_QUERIES if queries_given else MARGIN_FITTED


@dataclass(frozen=True)
class CrossFit:
    folds: int = 2
    z: float = 1.0
    scheme: str | None = None  # None: FOLD_SCHEME
    margin: float = 1.0  # the shift margin of the eps rule (compress resolves the calibrated default)

    def split(self, p: int) -> list[np.ndarray] | None:
        """Held-out query indices per fold, or ``None`` when there are too few queries (< 2 per fold)."""
        if self.folds < 2 or p < 2 * self.folds:
            return None
        if (self.scheme or FOLD_SCHEME) == "contiguous":
            return np.array_split(np.arange(p), self.folds)
        return [np.arange(f, p, self.folds) for f in range(self.folds)]  # "interleaved"


def take_queries(Q, idx: np.ndarray):
    """Rows ``idx`` of the query axis of ``Q (H, p, d)`` (either kind; no host copy of the data)."""
    if hasattr(Q, "device") and not isinstance(Q, np.ndarray):
        import torch  # noqa: PLC0415  (torch path only)

        return Q.index_select(-2, torch.as_tensor(idx, dtype=torch.int64, device=Q.device))
    return Q[:, idx]


@dataclass
class Scores:
    """Per level and head: the error used by the rule (``err``), the in-sample error and the SE."""

    err: np.ndarray  # (L, H) validated (cross-fitted) or in-sample
    err_in: np.ndarray  # (L, H)
    se: np.ndarray  # (L, H) standard error of err
    cross_fit: bool
    rule: str
    z: float
    margin: float = 1.0
    #: (L, H) the gap check's error (NaN where a level has no final build yet), or None: no gap check
    gap: np.ndarray | None = None
    gap_margin: float = MARGIN_GAP

    def bound(self) -> np.ndarray:
        """What is compared with ``eps``: ``margin * (err + z SE)`` when cross-fitted, else ``margin * err``; with
        the gap check, the larger of that and ``margin * gap_margin * gap`` (a NaN gap, a level not built yet,
        leaves the first term alone)."""
        b = self.margin * (self.err + self.z * self.se if self.cross_fit else self.err)
        if self.gap is not None:
            b = np.fmax(b, self.margin * self.gap_margin * self.gap)
        return b

    def meets(self, eps: float) -> np.ndarray:
        """``(L, H)`` rows that meet ``eps`` on their own (before the monotone rule of :func:`cheapest_meeting`)."""
        return (self.bound() <= eps) & ~self.worse_than_zero()

    def worse_than_zero(self) -> np.ndarray:
        """``(L, H)`` rows whose measured error (validated or in-sample, or the gap check's) is at least 1: an estimate
        no better than returning zero. Such a row never meets ``eps``, whatever the margin (without queries the
        calibrated margin is below 1, so ``margin x error <= eps`` alone let errors above 1 through at large eps)."""
        e = self.err if self.gap is None else np.fmax(self.err, self.gap)
        return np.nan_to_num(e, nan=0.0) >= 1.0

    def diagnostics(self, choice: np.ndarray) -> dict:
        cols = np.arange(self.err.shape[1])
        e = self.err[choice, cols]
        return {
            "error_per_head": e,
            "error": float(e.mean()),
            "error_in_sample_per_head": self.err_in[choice, cols],
            "error_in_sample": float(self.err_in[choice, cols].mean()),
            "error_se_per_head": self.se[choice, cols],
            "eps_rule": self.rule,
            "margin": self.margin,
            # what the rule compared with eps: the predicted error on later queries
            "error_bound_per_head": self.bound()[choice, cols],
            # per level (rows) and head: what the rule compared with eps, for inspection
            "error_levels": self.err,
            "error_se_levels": self.se,
            "error_in_sample_levels": self.err_in,
            **({} if self.gap is None else self._gap_diagnostics(choice, cols)),
        }

    def predicted(self) -> np.ndarray:
        """A point prediction of each row's error on the next queries (what ``method="auto"`` and ``ratio=`` rank
        by): the validated error; with the gap check, per :data:`AUTO_RANK`, the larger of it and ``gap_margin *
        gap`` (``"max"``) or ``gap_margin * gap`` alone (``"gap"``; the validated error where the gap is NaN, a level
        without a final build)."""
        if AUTO_RANK not in ("max", "gap"):
            raise ValueError(f"budget.AUTO_RANK must be 'max' or 'gap', got {AUTO_RANK!r}")
        if self.gap is None:
            return self.err
        if AUTO_RANK == "gap":
            return np.where(np.isnan(self.gap), self.err, self.gap_margin * self.gap)
        return np.fmax(self.err, self.gap_margin * self.gap)

    def _gap_diagnostics(self, choice, cols) -> dict:
        g = self.gap
        return {"error_gap_per_head": g[choice, cols], "error_gap_levels": g, "gap_margin": self.gap_margin}

    @staticmethod
    def stack(parts: list[Scores]) -> Scores:
        cat = lambda f: np.concatenate([f(p) for p in parts], axis=0)
        rules = sorted({p.rule for p in parts})
        gaps = [p.gap for p in parts]
        if any(g is None for g in gaps) and not all(g is None for g in gaps):
            raise ValueError("Scores.stack: every part or none must carry the gap check")
        return Scores(
            cat(lambda p: p.err),
            cat(lambda p: p.err_in),
            cat(lambda p: p.se),
            any(p.cross_fit for p in parts),
            "; ".join(rules),
            parts[0].z,
            parts[0].margin,
            None if gaps[0] is None else cat(lambda p: p.gap),
            parts[0].gap_margin,
        )


def _final_errors(work, built, g: int):
    """``(in-sample error, its SE, gap error or None)`` per head of a final build (all probes); ``g`` hidden tokens
    for the gap check (0: none). What :func:`score` and :func:`eps_search` both record for a level."""
    e, eg = work.final_errors(built, g)
    e, se = _mean_se(e)
    return e, se, (eg.mean(-1) if g else None)


def _mean_se(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the last axis and its standard error (``std(ddof=1) / sqrt(p)``; 0 for one query)."""
    p = e.shape[-1]
    se = e.std(-1, ddof=1) / np.sqrt(p) if p > 1 else np.zeros(e.shape[:-1])
    return e.mean(-1), se


def uses_queries(meth, opts, queries_given: bool) -> bool:
    f = getattr(meth, "uses_queries", None)
    return bool(f(opts, queries_given)) if f is not None else False


def _cross_fit_plan(work, meth, opts, cv: CrossFit) -> tuple[list | None, str]:
    """``(folds, rule)``: per fold ``(train probes, held-out rows, train rows)``
    (``None``: the method is judged in sample) and the rule's description."""
    p = int(work.probes.shape[-2])
    # without queries the probes are fitted to the keys and the method selects with the last keys: the
    # probe error is then out of selection already
    selects = uses_queries(meth, opts, work.queries_given) and getattr(work, "select", work.probes) is work.probes
    folds = cv.split(p) if selects else None
    if folds is None:
        why = "the method does not select with the probes" if cv.folds >= 2 else "folds=1"
        if not selects and uses_queries(meth, opts, work.queries_given):
            why = "the probes are fitted to the keys; the method selects with the last keys, not with them"
        if selects and cv.folds >= 2:
            why = f"too few queries to cross-fit ({p} < 2 x {cv.folds} folds)"
        return None, f"in-sample probe error x {cv.margin:g} <= eps ({why})"
    data = []
    for held in folds:
        train = np.setdiff1d(np.arange(p), held)
        data.append((take_queries(work.probes, train), held, train))
    scheme = cv.scheme or FOLD_SCHEME
    return data, f"cross-fitted: {cv.folds} {scheme} folds, {cv.margin:g} x (validated error + {cv.z:g} SE) <= eps"


def fold_probes(fold) -> tuple:
    """``(probes, probe_rows)`` of a fold's builds (its training queries and their rows)."""
    return fold[0], fold[2]


def _held_out(work, fold_builts, folds) -> tuple[np.ndarray, np.ndarray]:
    """Validated error and SE per head of one level from its fold builds (one per fold)."""
    e = [work.query_errors(b, held) for b, (_, held, _) in zip(fold_builts, folds)]
    return _mean_se(np.concatenate(e, axis=-1))


def score(work, name: str, meth, opts: dict, levels: list, builts: list, cv: CrossFit) -> Scores:
    """In-sample errors of ``builts`` (the builds of ``levels`` with all probes) and, for a method that
    selects with the probes, cross-fitted ones (one more build per level and fold, all built together by
    ``meth.build_many``; level ``None``, the exact cache, has error 0)."""
    L, H = len(levels), work.H
    err_in, se_in = np.zeros((L, H)), np.zeros((L, H))
    g = gap_tokens(work.n) if work.queries_given else 0
    gap = np.zeros((L, H)) if g else None  # the gap check, as in eps_search
    for i, (lv, b) in enumerate(zip(levels, builts)):
        if lv is not None:
            err_in[i], se_in[i], gi = _final_errors(work, b, g)
            if g:
                gap[i] = gi
    folds, rule = _cross_fit_plan(work, meth, opts, cv)
    if g:
        rule += _gap_rule(g)
    if folds is None:
        return Scores(err_in, err_in, se_in, False, rule, cv.z, cv.margin, gap)
    todo = [i for i, lv in enumerate(levels) if lv is not None]
    reqs = [(levels[i], work.context(name, opts, levels[i], *fold_probes(f))) for i in todo for f in folds]
    # in lockstep by chunks (the kernel matrices of one round of every build in a chunk are held at once)
    fb = [
        b
        for at in range(0, len(reqs), LOCKSTEP_CHUNK)
        for b in meth.build_many(work.Kw, work.Vw, reqs[at : at + LOCKSTEP_CHUNK])
    ]
    err, se = np.zeros((L, H)), np.zeros((L, H))
    for j, i in enumerate(todo):
        err[i], se[i] = _held_out(work, fb[j * len(folds) : (j + 1) * len(folds)], folds)
    return Scores(err, err_in, se, True, rule, cv.z, cv.margin, gap)


def _meets(err, err_in, se, cross: bool, rule: str, z: float, margin: float, j: int, eps: float, gap=None):
    """Per head, whether level ``j`` meets ``eps`` by the rule of :func:`cheapest_meeting` (asked on the
    exact row and row ``j``, the cheaper, so ``j`` is chosen exactly when it qualifies)."""
    rows = [0, j]
    sub = Scores(err[rows], err_in[rows], se[rows], cross, rule, z, margin, None if gap is None else gap[rows])
    cost = np.array([[1.0], [0.0]]) * np.ones((1, err.shape[1]))
    return cheapest_meeting(sub, cost, eps, exact_index=0) == 1


def level_chains(meth, levels: list) -> list[list[int]]:
    """The search's ladders: lists of indices into ``levels`` (``levels[0]`` the exact cache), each least to
    most compressed, along which the error is expected to grow (``Method.level_chains``; default: one ladder,
    every level in order)."""
    f = getattr(meth, "level_chains", None)
    if f is None:
        return [list(range(1, len(levels)))]
    return [[i + 1 for i in chain] for chain in f(levels[1:])]


def ladder_groups(meth, levels: list) -> tuple[np.ndarray, np.ndarray]:
    """``(groups, rank)`` per row of ``levels`` (row 0 the exact cache): the ladder of :func:`level_chains` each
    level is on and its position there, for :func:`cheapest_meeting` (a level on no ladder is a group alone)."""
    L = len(levels)
    groups, rank = np.arange(L) + L, np.zeros(L)
    for c, chain in enumerate(level_chains(meth, levels)):
        for r, i in enumerate(chain):
            groups[i], rank[i] = c, r
    groups[0] = -1
    return groups, rank


def eps_search(work, name: str, meth, opts: dict, levels: list, cv: CrossFit, eps: float, progress=None):
    """The empirical ``eps`` search of :func:`balancekv.compress`: ``(scores, builts)`` over ``levels``
    (``levels[0] = None``, the exact cache; then the method's levels).

    Doing the work once (issue 11): along each ladder of :func:`level_chains` (one for most methods: the
    levels least to most compressed) the levels are judged in order and the ladder stops at the first level
    that no head still on it meets (a head leaves a ladder at the first level it fails there). Each step
    builds together (``meth.build_many``: the balance walks run in lockstep, every ladder at once) the final
    build of a ladder's current level ``k`` (all probes) with the validation builds of ``k`` and of the next
    level (fold builds when cross-fitted, else the final builds): ``k``'s fate and the next level's are known
    after one step, and a final build is made only for a level a head on the ladder may still choose. The
    caller then applies :func:`cheapest_meeting` to the rows judged: rows never judged are NaN (never meet),
    their builds ``None``; a level judged but never built (it failed for every head still on its ladder) is
    priced at infinity by the caller, so it is never chosen. With errors that grow along a ladder this chooses
    what judging every level would; otherwise a head may get a less compressed level than the cheapest
    meeting ``eps`` (the chosen level still meets it, validated)."""
    L, H = len(levels), work.H
    nan = lambda: np.full((L, H), np.nan)
    err, err_in, se, se_in = nan(), nan(), nan(), nan()
    err[0] = err_in[0] = se[0] = se_in[0] = 0.0
    folds, rule = _cross_fit_plan(work, meth, opts, cv)
    cross = folds is not None
    # the gap check (MARGIN_GAP): with observed queries, each final build is also measured with the cache's last
    # tokens hidden; a level not built yet has NaN there (its validated error alone can stop the ladder)
    g = gap_tokens(work.n) if work.queries_given else 0
    gap = None
    if g:
        gap = nan()
        gap[0] = 0.0
        rule += _gap_rule(g)
    builts: list = [None] * L
    builts[0] = work.build(name, meth, opts, None)
    judged = np.zeros(L, bool)
    judged[0] = True
    meets = lambda j: _meets(err, err_in, se, cross, rule, cv.z, cv.margin, j, eps, gap)
    # per ladder: its levels, the position of its current level, the heads that met every level so far
    ladders = [[chain, 0, np.ones(H, bool)] for chain in level_chains(meth, levels) if chain]
    while True:
        jobs: list = []
        for lad in ladders:
            chain, at, active = lad
            # advance as far as what is judged and built allows
            while at < len(chain) and active.any() and judged[chain[at]]:
                k = chain[at]
                if not (active & meets(k)).any():
                    active = np.zeros(H, bool)  # no head on this ladder meets its next level: it stops here
                elif builts[k] is not None:
                    active, at = active & meets(k), at + 1
                else:
                    break
            lad[1], lad[2] = at, active
            if at >= len(chain) or not active.any():
                continue
            k = chain[at]
            if builts[k] is None and ("final", k, None) not in jobs:
                jobs.append(("final", k, None))
            for j in chain[at : at + 2]:
                if not judged[j]:
                    if cross:
                        jobs += [("fold", j, f) for f in range(len(folds)) if ("fold", j, f) not in jobs]
                    elif builts[j] is None and ("final", j, None) not in jobs:
                        jobs.append(("final", j, None))
        if not jobs:
            break
        reqs = [
            (levels[j], work.context(name, opts, levels[j], *(() if kind == "final" else fold_probes(folds[f]))))
            for kind, j, f in jobs
        ]
        got = dict(zip(jobs, meth.build_many(work.Kw, work.Vw, reqs)))
        for (kind, j, _), b in got.items():
            if kind == "final":
                builts[j] = b
                err_in[j], se_in[j], gj = _final_errors(work, b, g)
                if gap is not None:
                    gap[j] = gj
                if progress is not None:
                    progress.update(1)
        for j in sorted({j for _, j, _ in jobs}):
            if not judged[j]:
                if cross:
                    err[j], se[j] = _held_out(work, [got[("fold", j, f)] for f in range(len(folds))], folds)
                else:
                    err[j], se[j] = err_in[j], se_in[j]
                judged[j] = True
    if not cross:
        err_in = err
    return Scores(err, err_in, se, cross, rule, cv.z, cv.margin, gap), builts


def cheapest_meeting(
    sc: Scores,
    cost: np.ndarray,
    eps: float,
    exact_index: int | None = 0,
    groups=None,
    monotone: bool = True,
    rank=None,
) -> np.ndarray:
    """Per head, the index of the fewest bytes (``cost (L, H)``) among the rows meeting ``eps``; the exact
    row always qualifies; ties go to the later (more compressed) index. A row whose measured error is 1 or more
    (:meth:`Scores.worse_than_zero`) never meets ``eps``.

    ``monotone`` (default): a row meets ``eps`` only when every row of its group (``groups``: one label per
    row, e.g. the method of each candidate; default one group) holding more bytes on that head meets it
    too: the search stops at the first level that fails, so an estimate that dips at a deeper level (on
    SmolLM2 the fitted probes did, the error on the next queries did not) is not trusted. ``rank`` (one number per
    row) orders a group instead of the bytes: the ladders of :func:`eps_search` (:func:`ladder_groups`), whose
    order is the search's (a level of fewer tokens may hold more bytes: ``balance+quant`` below one quantization
    group keeps its tokens unquantized, and by bytes it vetoed every cheaper level of every bit width).
    """
    ok = sc.meets(eps)
    if monotone:
        L = cost.shape[0]
        labels = np.zeros(L, dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
        for g in np.unique(labels):
            rows = np.flatnonzero((labels == g) & (np.arange(L) != (-1 if exact_index is None else exact_index)))
            for h in range(cost.shape[1]):
                if rank is not None:
                    order = rows[np.lexsort((rows, np.asarray(rank)[rows]))]
                else:
                    # most bytes first, ties by index; a row priced at infinity (judged, never built: it failed for
                    # every head still searching, eps_search) ranks as the cheapest, after every built row
                    c_h = np.where(np.isfinite(cost[rows, h]), cost[rows, h], -1.0)
                    order = rows[np.lexsort((rows, -c_h))]
                ok[order, h] = np.logical_and.accumulate(ok[order, h])
    if exact_index is not None:
        ok[exact_index] = True
    c = np.where(ok, cost, np.inf) - 1e-9 * np.arange(cost.shape[0])[:, None]
    return np.argmin(c, axis=0)


def uniform_if_not_dearer(work, builts, choice: np.ndarray, per_head: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``choice`` (per head), or every head at the dearest level it holds when that level meets ``eps`` on
    every head (``ok (L, H)``; row 0, the exact cache, always does) and its cache bills fewer bytes.

    A cache whose heads chose different levels is held ragged (:class:`balancekv.compressed.RaggedKV`: one
    sub-cache per level over the heads that chose it), so it bills about the sum of its heads' own levels
    and this rarely changes the choice now. It still does where the mix bills more: levels whose decode
    stream cannot be split per head (balance-stream, SubGen, StreamingLLM) are held masked, every used
    level for every head (before the ragged store, padded dense slots made one exact head cost a SmolLM2
    layer 1.09x the fp16 cache, and mixed ``balance+quant`` bit widths up to 5x). The uniform cache then
    has fewer bytes and an error no larger on every head. (At equal bytes the per-head choice is kept.)
    """
    used = sorted(set(np.asarray(choice).tolist()))
    if len(used) < 2:
        return choice
    u = max(used, key=lambda i: (per_head[i], -i))
    if u != 0 and not ok[u].all():
        return choice
    uniform = np.full_like(choice, u)
    mixed = work.finalize(builts, choice, "measure", {}).nbytes  # a mixed cache converts no stream in place
    return uniform if _final_nbytes(work, builts[u]) < mixed else choice


# ---------------------------------------------------------------------- the byte budget
def families(meth, n: int, opts: dict) -> list[tuple[str, object]]:
    """The budget axes of a method: ``(label, level_of)`` with ``level_of(B)`` the level keeping at most
    ``B`` tokens (token-selecting methods; one family per bits for the quantized ones), or
    ``(label, [levels])`` for methods that keep every token (their discrete levels)."""
    if not meth.selects_tokens:  # the exact cache (level None) too, as a token-selecting family's B = n
        return [("levels", [None, *meth.levels(n, opts)])]
    bits = sorted({lv["bits"] for lv in meth.levels(n, opts) if "bits" in lv}, reverse=True)

    def keep_level(B):
        return None if B >= n else meth.level_for_keep(B / n, n, opts)

    if not bits:
        return [("tokens", keep_level)]
    return [(f"tokens@{b}bits", lambda B, b=b: {**meth.level_for_keep(B / n, n, opts), "bits": int(b)}) for b in bits]


class Fitter:
    """Builds and bills candidate levels of one method against a byte budget (each level built once)."""

    def __init__(self, work, name, meth, opts, budget_bytes: float):
        self.work, self.name, self.meth, self.opts, self.budget = work, name, meth, opts, budget_bytes
        self.seen: dict = {}  # level key -> (nbytes, built)
        self.smallest = np.inf

    def nbytes(self, level):
        key = repr(sorted(level.items())) if level is not None else "exact"
        if key not in self.seen:
            b = self.work.build(self.name, self.meth, self.opts, level)
            # billed as the final cache: a throwaway copy of the built's segments (streams are not converted)
            self.seen[key] = (_final_nbytes(self.work, b), b)
        nb = self.seen[key][0]
        self.smallest = min(self.smallest, nb)
        return nb

    def fits(self, level) -> bool:
        return self.nbytes(level) <= self.budget

    def largest(self, level_of) -> object | bool:
        """The level of the most tokens ``B`` that fits (bisection on ``B`` above the smallest fitting power of two,
        every probe billed); ``False`` when no ``B`` fits."""
        n = self.work.n
        lo = 1
        # a method without a configuration that small falls back to the exact cache there (balance-stream's
        # joint sets): the smallest fitting count is then found by doubling, and the bisection runs above it
        while not self.fits(level_of(lo)):
            if lo >= n:
                return False
            lo = min(2 * lo, n)
        if self.fits(level_of(n)):
            return level_of(n)
        hi = n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(level_of(mid)) else (lo, mid)
        return level_of(lo)

    def built(self, level):
        return self.seen[repr(sorted(level.items())) if level is not None else "exact"][1]


def _final_nbytes(work, built) -> int:
    """Bytes the cache of this one build would hold, in the caller's kind (weights, positions, codes and the
    decode stream's state included), without converting the build's own stream."""
    import copy  # noqa: PLC0415

    b = copy.copy(built)
    if built.stream is not None and hasattr(built.stream, "to_kind"):
        b.stream = copy.deepcopy(built.stream)  # the conversion is the cache's; measured on a copy
    c = work.finalize([b], np.zeros(work.H, dtype=int), "measure", {})
    return int(c.nbytes)


def fitting_levels(work, name, meth, opts, budget_bytes) -> tuple[list, list, float]:
    """Per budget family of the method, the largest level within ``budget_bytes``, its build; and the
    smallest bytes any level billed (for the error message)."""
    f = Fitter(work, name, meth, opts, budget_bytes)
    out = []
    for _, fam in families(meth, work.n, opts):
        if callable(fam):
            lv = f.largest(fam)
            if lv is not False:
                out.append(lv)
        else:
            fit = [lv for lv in fam if f.fits(lv)]
            if fit:
                out.append(max(fit, key=f.nbytes))
    return out, [f.built(lv) for lv in out], f.smallest


def too_small(ratio: float, what: str, smallest_bytes: float, work) -> ValueError:
    return ValueError(
        f"ratio={ratio:g} is below what {what} can hold: the smallest achievable ratio here is "
        f"{smallest_bytes / work.input_nbytes:.4g} ({int(smallest_bytes)} bytes of {work.input_nbytes}; one token "
        "per head with its weights and position, or the fewest bits)"
    )


def ratio_search(work, name, meth, opts, cv: CrossFit, diag: dict, ratio: float, measure: bool = False):
    """``compress(..., ratio=r)`` for one method: the largest level whose cache holds at most ``r`` of the
    full cache's bytes (one level for every head)."""
    budget = ratio * work.input_nbytes
    levels, builts, smallest = fitting_levels(work, name, meth, opts, budget)
    if not levels:
        raise too_small(ratio, f"method {name!r}", smallest, work)
    sc = None
    if len(levels) > 1 or measure:
        sc = score(work, name, meth, opts, levels, builts, cv)
    pick = int(np.argmin(sc.predicted().mean(-1))) if len(levels) > 1 else 0
    choice = np.zeros(work.H, dtype=int)
    diag.update(
        {
            "budget_bytes": int(budget),
            "levels": [levels[pick]],
            "level_candidates": levels,
            "level_per_head": choice.reshape(work.lead),
            "level_info": [builts[pick].info],
            "retries": int(builts[pick].info.get("retries", 0)),
            "fallbacks": int(builts[pick].info.get("fallbacks", 0)),
        }
    )
    if sc is not None:
        gap = None if sc.gap is None else sc.gap[[pick]]
        one = Scores(sc.err[[pick]], sc.err_in[[pick]], sc.se[[pick]], sc.cross_fit, sc.rule, sc.z, sc.margin, gap)
        d = one.diagnostics(choice)
        d["error_per_head"] = d["error_per_head"].reshape(work.lead)
        for k in ("eps_rule", "margin", "error_bound_per_head", "gap_margin", "error_gap_levels"):
            d.pop(k, None)
        d["error_rule"] = sc.rule
        d.update(error_levels=sc.err, error_se_levels=sc.se, error_in_sample_levels=sc.err_in)
        diag.update(d)
    c = work.finalize([builts[pick]], choice, name, diag)
    assert c.nbytes <= budget, (c.nbytes, budget)  # every candidate was billed as this cache
    return c
