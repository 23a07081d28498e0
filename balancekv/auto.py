"""``method="auto"``: per head, the best of several methods and their levels (issue 12, item 4).

Candidates (:data:`DEFAULT_CANDIDATES`, option ``candidates``): ``balance``,
``uniform-halving``, ``snapkv``, ``h2o``, ``streaming``, ``uniform``, ``quant``,
``minikv``, ``balance+quant``, each with its defaults (option ``method_options``:
``{name: {option: value}}``). Left out: ``exact`` (it is every search's fallback),
and the theory-faithful ``subgen`` and ``balance-stream``: their builds loop in
Python over tokens or heads (seconds to minutes at n = 2048 where the others take
milliseconds) and run the NumPy reference on torch input. A candidate whose build
refuses the data (e.g. ``group`` not dividing the value dimension) is skipped and
named in ``diagnostics["auto_skipped"]``.

Every candidate is judged by the error ``compress`` uses for it: validated
(cross-fitted, :mod:`balancekv.budget`) when it selects with the queries, the probe
error otherwise. Then, per head:

- ``eps``: the fewest held bytes among all candidates' levels whose error (+ z SE when
  cross-fitted) meets ``eps`` (the exact cache always qualifies);
- ``ratio``: each candidate's largest level(s) within the byte budget
  (:func:`balancekv.budget.fitting_levels`); the best single one (smallest mean
  error over heads) is the start, and dense candidates without decode state are then
  mixed in per head (each head takes the candidate with its smallest error) as long as
  the mixed cache, billed in full, still fits. A mix is held ragged (one sub-cache per
  candidate over the heads that chose it, :class:`balancekv.compressed.RaggedKV`), so the
  mix of candidates that each fit fits too; quantized or streaming candidates are only
  taken whole here (not mixed in). The result never has a larger mean error than the best
  single candidate at the same budget;
- ``keep``: the token-selecting candidates at kept fraction ``keep`` (each keeps at most
  ``ceil(keep n)`` tokens per head), chosen and mixed as for ``ratio`` without a byte cap
  (the best single candidate, then dense candidates per head).

Per-head choices are assembled by :func:`balancekv.api._combine` (one sub-cache per chosen
candidate over its heads; segments masked per head for streams that cannot be split).
Diagnostics: ``candidates`` (row ``i``: method and level), ``method_per_head``,
``level_per_head`` (rows), the errors of :meth:`balancekv.budget.Scores.diagnostics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import budget
from ._arrays import held_nbytes
from .methods import REGISTRY, get_method
from .methods.base import Method
from .storage import DenseStore

DEFAULT_CANDIDATES = (
    "balance",
    "uniform-halving",
    "snapkv",
    "h2o",
    "streaming",
    "uniform",
    "quant",
    "minikv",
    "balance+quant",
)
EXCLUDED = ("auto", "exact", "subgen", "balance-stream")


class Auto(Method):
    name = "auto"
    defaults = {"candidates": DEFAULT_CANDIDATES, "method_options": {}}
    selects_tokens = True  # keep: chooses among the token-selecting candidates

    def check_options(self, opts):
        c = opts["candidates"]
        if isinstance(c, str) or not isinstance(c, (list, tuple)) or not c:
            raise TypeError(f"option candidates must be a non-empty list of method names, got {c!r}")
        for name in c:
            if name not in REGISTRY or name in ("auto", "exact"):
                raise ValueError(f"option candidates: {name!r} is not a candidate method (registered, not auto/exact)")
        mo = opts["method_options"]
        if not isinstance(mo, dict) or not all(isinstance(v, dict) for v in mo.values()):
            raise TypeError("option method_options must be a dict {method name: {option: value}}")
        extra = sorted(set(mo) - set(c))
        if extra:
            raise ValueError(f"option method_options names methods that are not candidates: {extra}")

    def uses_queries(self, opts, queries_given):
        return any(
            get_method(m).uses_queries(get_method(m).resolve_options(opts["method_options"].get(m, {})), queries_given)
            for m in opts["candidates"]
        )

    def levels(self, n, opts):
        raise ValueError("method 'auto' searches in compress (it has no levels of its own)")

    def build(self, K, V, level, ctx):
        raise ValueError("method 'auto' is built by compress (balancekv.auto.search)")


def _mixable(b) -> bool:
    return b.stream is None and all(
        isinstance(s.keys, DenseStore) and isinstance(s.values, DenseStore) for s in b.segments
    )


def search(work, opts: dict, cv: budget.CrossFit, diag: dict, *, eps=None, keep=None, ratio=None, progress=False):
    H, n = work.H, work.n
    rows: list[tuple[str, Any]] = []  # (method, level) per candidate row
    builts, scores, skipped, rules = [], [], {}, {}

    def add(name, meth, mo, levels, bs=None):
        bs = bs if bs is not None else [work.build(name, meth, mo, lv) for lv in levels]
        sc = budget.score(work, name, meth, mo, levels, bs, cv)
        rows.extend((name, lv) for lv in levels)
        builts.extend(bs)
        scores.append(sc)
        rules[name] = sc.rule

    if eps is not None:  # row 0: the exact fallback
        ex = get_method("exact")
        add("exact", ex, {}, [None])
    budget_bytes = None if ratio is None else ratio * work.input_nbytes
    smallest = np.inf
    for name in opts["candidates"]:
        meth = get_method(name)
        try:
            mo = meth.resolve_options(dict(opts["method_options"].get(name, {})))
            if keep is not None:
                if not meth.selects_tokens:
                    continue
                add(name, meth, mo, [None if keep == 1 else meth.level_for_keep(keep, n, mo)])
            elif eps is not None:
                add(name, meth, mo, meth.levels(n, mo))
            else:
                levels, bs, small = budget.fitting_levels(work, name, meth, mo, budget_bytes)
                smallest = min(smallest, small)
                if levels:
                    add(name, meth, mo, levels, bs)
        except ValueError as e:  # the candidate refuses these data or options
            skipped[name] = str(e)
    if not rows:
        if ratio is not None and np.isfinite(smallest):
            raise budget.too_small(ratio, "any candidate of method 'auto'", smallest, work)
        raise ValueError(f"method 'auto': no candidate could be built ({skipped})")
    sc = budget.Scores.stack(scores)
    if keep is not None:  # like ratio, without a byte cap: whole candidates, dense ones mixed per head
        c = _ratio_mix(work, builts, rows, sc, diag, skipped, rules, None)
    elif eps is not None:
        cost = np.array([held_nbytes(b.segments) / H for b in builts])[:, None] * np.ones((1, H))
        choice = budget.cheapest_meeting(sc, cost, eps, exact_index=0, groups=[name for name, _ in rows])
        c = _finish(work, builts, choice, rows, sc, diag, skipped, rules)
    else:
        c = _ratio_mix(work, builts, rows, sc, diag, skipped, rules, budget_bytes)
    return c


def _ratio_mix(work, builts, rows, sc, diag, skipped, rules, budget_bytes):
    H = work.H
    pred = sc.predicted()  # validated error, and with queries at least the gap check's (budget.MARGIN_GAP)
    mean = pred.mean(-1)
    best = int(np.argmin(mean))
    S = [best]
    choice = np.full(H, best)
    c = _finish(work, builts, choice, rows, sc, diag, skipped, rules)
    fits = lambda x: budget_bytes is None or x.nbytes <= budget_bytes
    assert fits(c)
    if _mixable(builts[best]):
        others = [i for i in np.argsort(mean) if i != best and _mixable(builts[i])]
        improved = True
        while improved:
            improved = False
            for i in others:
                if i in S:
                    continue
                T = S + [int(i)]
                trial = np.asarray(T)[np.argmin(pred[T], axis=0)]  # ties: the earlier member
                if pred[trial, np.arange(H)].mean() >= pred[choice, np.arange(H)].mean() - 1e-15:
                    continue
                ct = _finish(work, builts, trial, rows, sc, diag, skipped, rules)
                if fits(ct):
                    S, choice, c, improved = T, trial, ct, True
    c.diagnostics["auto_best_single"] = _label(rows[best])
    if budget_bytes is not None:
        c.diagnostics["budget_bytes"] = int(budget_bytes)
    return c


def _label(row) -> str:
    name, lv = row
    return name if lv is None else f"{name}{dict(lv)}"


def _finish(work, builts, choice, rows, sc, diag, skipped, rules):
    used = sorted(set(choice.tolist()))
    infos = [builts[u].info for u in used]
    d = dict(diag)
    d.update(sc.diagnostics(choice))
    d["error_per_head"] = np.asarray(d["error_per_head"]).reshape(work.lead)
    d.update(
        {
            "candidates": [_label(r) for r in rows],
            "method_per_head": np.array([rows[i][0] for i in choice]).reshape(work.lead),
            "level_per_head": choice.reshape(work.lead),
            "levels": [rows[i][1] for i in range(len(rows))],
            "level_info": infos,
            "auto_rules": rules,
            "auto_skipped": skipped,
            "retries": int(sum(i.get("retries", 0) for i in infos)),
            "fallbacks": int(sum(i.get("fallbacks", 0) for i in infos)),
        }
    )
    return work.finalize(builts, choice, "auto", d)
