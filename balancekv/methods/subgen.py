"""``subgen``: SubGen [SUB] — online key clustering and reservoir samples, in sublinear memory.

Two estimators (option ``estimator``), both built on the same clustering and reservoirs
(:mod:`balancekv.reference.subgen`; torch: :mod:`balancekv.fast.subgen`, same uniforms, same state):

- ``"cluster"`` (default, measured best on real caches, ``benchmarks/README.md`` section
  "Streaming and sublinear methods"): the numerator comes from the *same* cluster samples as the
  denominator — one weighted set (``num_logw == den_logw = log(n_c / t)``, members of clusters with
  at most ``t`` members exact), i.e. a ratio estimator that cannot blow up at any key norm — plus the
  first ``sink`` tokens and an exact recent window (``window_frac`` of the budget) that slides during
  decoding (tokens leaving it enter the sketch). With the default ``m = 1`` this is one stratum:
  a reservoir sample of the middle (more centres with equal slots per cluster measured worse; a
  proportional allocation is not implemented). With observed ``queries``, the ``heavy_frac`` share of
  the budget keeps the middle's heavy hitters exactly (largest ``sum_l softmax(scale <q_l, k_i>)``,
  balance's scores) and the sample stands for the rest of the middle only (a second stratum held
  exactly): on real caches the attention reads single middle tokens that a sample weights by
  ``n_c / t`` or misses (``benchmarks/README.md``, session 9). Without queries that share goes to the
  sample.
- ``"l2"`` (the paper's, two-set, SPEC 5): numerator slots by l2 value sampling,
  ``num_logw = log(mu / (s_num ||v||^2))``, denominator from the clusters; default ``m = 16``;
  ``guarantee="theorem"`` always uses it. Numerator tokens absent from the denominator set enter it
  with a guard weight ``GUARD / s_num`` (relative bias ``<= 1e-12``), which bounds ``|z(q)|`` so the
  estimate never overflows; its probe error is measured at build and an estimate worse than 1 is
  flagged (``info["unreliable_heads"]``) with an :class:`~balancekv.methods.base.UnreliableEstimateWarning`.

Squared value norms are taken of ``v / u`` with ``u`` a power of two per head (1 unless
``max |v| > 2^400``), so values near 1e154 do not overflow. ``keep=1`` stores every token exactly;
a result that would hold more bytes than the exact cache is the exact cache. On the torch path
the cache's segments are views of the sketch's tensors (nothing held twice). The NumPy reference
sketch holds its tokens in the cache's dtypes and its segments are a padded copy, built for each read
and not kept (:attr:`SubGenStream.segments_are_copies`).

Options
-------
variant : ``"offline"`` (default; greedy k-centre with ``m`` centres, what [SUB]'s
    experiments ran) or ``"stream"`` (online threshold clustering, [SUB] Thm 2.4).
estimator : ``"cluster"`` (default) or ``"l2"`` (see above).
m : number of centres (default ``None``: 1 for ``cluster``, 16 for ``l2``; at most the budget
    allows); with ``variant="stream"`` and ``threshold=None`` it sets the automatic threshold. With
    one centre the sketch never opens a cluster (a single reservoir, flat memory).
threshold : stream clustering radius on folded keys ``scale * k``; ``None`` (default):
    per head, the radius of greedy k-centre with ``m`` centres on the prompt's keys.
num_frac : ``l2``: share of the kept budget given to numerator slots (default 0.5).
t, s_num : fix the reservoir slots per cluster / the numerator slots at every level.
sink, window_frac : ``cluster``: exact first tokens (default 4) and the exact recent window's share
    of the budget (default 0.4).
heavy_frac : ``cluster``, offline with its automatic ``t``, with observed queries: the share of the budget
    kept as exact heavy hitters (default 0.3, chosen on the tuning text at equal bytes; 0 turns them off).
    They take at most what the window leaves, so the sample keeps at least one slot.

Budget for a kept fraction ``keep`` (``B = round(keep * n)`` slots): ``cluster``: ``sink`` +
``round(window_frac B)`` exact (and ``round(heavy_frac B)`` heavy hitters with queries), ``t = B_den // m``
per cluster with the rest; ``l2``: ``s_num =
round(num_frac B)`` and ``t = (B - s_num) // m`` (offline: ``m`` capped at the budget; stream:
``m`` is each head's number of prompt clusters, so ``t`` may differ per head). ``info["kept"]``
reports the slots held (torch: slots, a token drawn twice counts twice; NumPy: distinct tokens).
"""

from __future__ import annotations

import math

import numpy as np

from balancekv.backends import resolve
from balancekv.bounds.subgen import stable_rank, subgen_sample_sizes
from balancekv.reference import softmax_attention as ra
from balancekv.reference.subgen import ESTIMATORS, SubGenState, fold_scale

from .._arrays import held_nbytes, is_torch, torch
from ..storage import DenseStore, dense_segment, exact_segment, gather_tokens
from .base import Built, Method, check_float_option, check_int_option, flag_probe_error, probe_error, top_tokens

VARIANTS = ("offline", "stream")


def _unit(V) -> np.ndarray:
    """Per head a power of two ``u >= max |v|`` when ``max |v| > 2^400`` (else 1): squared norms of
    ``v / u`` cannot overflow, and dividing by a power of two is exact (issue 15 item 4)."""
    m = (V.abs().amax(dim=(-1, -2)).tolist()) if is_torch(V) else np.abs(V).max(axis=(-1, -2)).tolist()
    return np.asarray([2.0 ** math.ceil(math.log2(x)) if x > 2.0**400 else 1.0 for x in m])


def _complement(top, n: int):
    """``(H, n - h)``: per row, the indices in ``range(n)`` not in ``top (H, h)``, in increasing order."""
    H, h = (int(x) for x in top.shape)
    if is_torch(top):
        keep = torch.ones((H, n), dtype=torch.bool, device=top.device).scatter_(1, top, False)
        return keep.nonzero()[:, 1].reshape(H, n - h)
    keep = np.ones((H, n), dtype=bool)
    np.put_along_axis(keep, top, False, axis=1)
    return np.nonzero(keep)[1].reshape(H, n - h)


#: relative weight of the numerator-only slots in the denominator of the two-set (``l2``) estimate
GUARD = 1e-12


def state_segments(state, offset: int = 0):
    """The sketch as segments (positions shifted by ``offset``).

    Torch: views of the state's tensors (the cache shares them). NumPy: one padded segment (a copy).
    Two-set (``l2``) sketches: numerator slots whose token is not in the denominator set enter it with
    the guard weight ``GUARD / #numerator slots`` (relative bias ``<= GUARD``), which bounds ``|z(q)|``
    for every query so the estimate cannot overflow at any key norm; unreliable estimates are flagged.
    """
    if not isinstance(state, SubGenState):
        return [dense_segment(*x, "subgen") for x in state.views(offset, GUARD)]
    pos, K, V, nl, dl = state.padded()
    pos = pos + offset * (pos >= 0)
    only_num = np.isfinite(nl) & ~np.isfinite(dl)
    if only_num.any():  # GUARD / s_num per numerator slot holding the token
        slots = np.zeros(nl.shape)
        for h, head in enumerate(state.heads):
            held, count = np.unique(head.num_pos[head.num_pos >= 0], return_counts=True)
            rel = pos[h] - offset
            at = np.searchsorted(held, rel) % max(1, held.size)
            slots[h] = np.where(np.isin(rel, held), count[at] if held.size else 0, 0)
        dl = np.where(only_num, np.log(GUARD * np.maximum(slots, 1) / state.s_num), dl)
    return [dense_segment(K, V, nl, dl, pos, "subgen")]


def one_stratum(state):
    """Make ``state`` a single reservoir that never opens a cluster (flat memory); returns it."""
    if isinstance(state, SubGenState):
        for head in state.heads:
            head.threshold = float("inf")
    else:
        state.thr.fill_(float("inf"))
    return state


def centres(opts: dict, estimator: str | None = None) -> int:
    """The option ``m``, or its measured default: 1 for the ``cluster`` estimator (one stratum: more
    centres with equal slots per cluster measured worse on real caches), 16 for ``l2`` (the paper's)."""
    if opts["m"] is not None:
        return int(opts["m"])
    return 1 if (estimator or opts["estimator"]) == "cluster" else 16


class SubGenStream:
    """Decode-time state: sinks exact, an exact recent window, every older token through SubGen's update.

    Memory stays flat: the sinks and the window have fixed sizes, and SubGen's state is
    ``O(m t + s_num)`` tokens. ``offset``: stream position of the state's token 0 (the sinks come first).
    """

    def __init__(
        self,
        state,
        rng: np.random.Generator,
        *,
        sinks=None,
        window=None,
        window_size=0,
        offset=0,
        factory=None,
        heavy=None,
    ):
        self.state, self.rng = state, rng
        self.sinks, self.window, self.W, self.offset = sinks, window, int(window_size), int(offset)
        #: ``(K, V, positions (H, h))``: the prompt's heavy hitters, exact (fixed while decoding)
        self.heavy = heavy
        #: ``factory(K, V)`` builds the sketch from the first tokens leaving the window when ``state`` is None
        self.factory = factory

    def to_kind(self, kind) -> None:
        """Hold the state in the cache's kind, once, after the build: sinks, heavy hitters, window and the sketch's
        sampled tokens in its storage dtypes (a sketch the capped policy builds later too). A torch cache's segments
        are then views of the sketch; the reference sketch's are a padded copy, built per read and not kept. A cache
        of another kind than the working one (NumPy input on the torch backend) keeps the state as it is: its
        segments are converted when read."""
        held = next((x[0] for x in (self.sinks, self.window) if x is not None), None)
        torch_state = self.state is not None and not isinstance(self.state, SubGenState)
        if (is_torch(held) if held is not None else torch_state) != kind.is_torch:
            self._other_kind = True
            return
        if self.sinks is not None:
            self.sinks = self._in_kind(self.sinks, kind)
        if self.heavy is not None:
            self.heavy = self._in_kind(self.heavy, kind)
        if self.window is not None:
            self.window = self._in_kind(self.window, kind)
        self._hold = (kind.dtype, kind.value_dtype)  # (a sketch built later, from the first evicted tokens, too)
        if self.state is not None:  # (the reference sketch in NumPy dtypes, the torch one in torch dtypes)
            self.state.hold_tokens_as(*self._hold)

    @property
    def segments_are_copies(self) -> bool:
        """True when :meth:`segments` builds new arrays: the reference sketch's are a padded copy of its slots, and
        a cache of another kind converts the state's. The cache then reads them when it needs them and does not
        keep them, so nothing is held twice (a torch sketch's segments in its own kind are views)."""
        return isinstance(self.state, SubGenState) or getattr(self, "_other_kind", False)

    def push(self, k, v, pos) -> None:
        """:meth:`append` without building the segments."""
        self._take(k, v, pos)

    @staticmethod
    def _in_kind(kvp, kind):
        k, v, p = kvp  # (the positions stay the stream's (m,) ints)
        return DenseStore(k).to_kind(kind).x, DenseStore(v).to_kind(kind.for_values()).x, p

    def append(self, k, v, pos):
        self._take(k, v, pos)
        return self.segments()

    def _take(self, k, v, pos) -> None:
        t = is_torch(k)
        cat = (lambda xs, ax: torch.cat(xs, ax)) if t else (lambda xs, ax: np.concatenate(xs, ax))
        if self.window is None:
            wk, wv, wp = k, v, pos
        else:  # the new tokens in the window's dtypes (the cache's, after to_kind)
            new = [x.to(w.dtype) if t else np.asarray(x, w.dtype) for w, x in zip(self.window, (k, v, pos))]
            wk, wv, wp = (cat([a, b], -2 if i < 2 else -1) for i, (a, b) in enumerate(zip(self.window, new)))
        ev = int(wk.shape[-2]) - self.W
        if ev > 0:  # the oldest tokens leave the window for the sketch
            if self.state is None:  # (a capped sketch of a short prompt starts with the first evicted tokens)
                self.state = self.factory(wk[:, :ev], wv[:, :ev])
                if getattr(self, "_hold", None) is not None:  # in the cache's storage dtypes, like a built one
                    self.state.hold_tokens_as(*self._hold)
            else:
                self.state.append(wk[:, :ev], wv[:, :ev], wp[:ev] - self.offset, rng=self.rng)
            cp = (lambda x: x.clone()) if t else (lambda x: x.copy())
            wk, wv, wp = cp(wk[:, ev:]), cp(wv[:, ev:]), cp(wp[ev:])  # own storage: not a view of the chunk
        self.window = (wk, wv, wp) if int(wk.shape[-2]) else None

    def segments(self):
        out = []
        if self.sinks is not None:
            out.append(exact_segment(*self.sinks, label="sink"))
        if self.heavy is not None:
            out.append(exact_segment(*self.heavy, label="heavy"))
        if self.state is not None:
            out += state_segments(self.state, self.offset)
        if self.window is not None:
            out.append(exact_segment(*self.window, label="window"))
        return out


class SubGen(Method):
    name = "subgen"
    defaults = {
        "variant": "offline",
        "estimator": "cluster",
        "m": None,
        "threshold": None,
        "num_frac": 0.5,
        "t": None,
        "s_num": None,
        "sink": 4,
        "window_frac": 0.4,
        "heavy_frac": 0.3,
    }
    has_theorem = True

    def rng_level(self, level):
        """The level without its heavy-hitter sizes: without queries (no heavy hitters) a build draws what
        ``heavy_frac=0``'s does."""
        return {k: v for k, v in level.items() if not k.startswith("heavy")}

    def uses_queries(self, opts, queries_given):
        heavy = opts["heavy_frac"] > 0 and opts["variant"] == "offline" and opts["t"] is None
        return bool(queries_given and opts["estimator"] == "cluster" and heavy)

    def check_options(self, opts):
        if opts["variant"] not in VARIANTS:
            raise ValueError(f"option variant must be one of {VARIANTS}, got {opts['variant']!r}")
        if opts["estimator"] not in ESTIMATORS:
            raise ValueError(f"option estimator must be one of {ESTIMATORS}, got {opts['estimator']!r}")
        if opts["m"] is not None:
            check_int_option(opts, "m", 1)
        if opts["threshold"] is not None:
            check_float_option(opts, "threshold", 0.0)
        check_float_option(opts, "num_frac", 0.0, 1.0, lo_open=True)
        if opts["num_frac"] >= 1.0:
            raise ValueError(f"option num_frac must lie in (0, 1), got {opts['num_frac']}")
        for name in ("t", "s_num"):
            if opts[name] is not None:
                check_int_option(opts, name, 1)
        check_int_option(opts, "sink", 0)
        check_float_option(opts, "window_frac", 0.0, 1.0)
        if opts["window_frac"] >= 1.0:
            raise ValueError(f"option window_frac must lie in [0, 1), got {opts['window_frac']}")
        check_float_option(opts, "heavy_frac", 0.0, 1.0)
        if opts["heavy_frac"] >= 1.0:
            raise ValueError(f"option heavy_frac must lie in [0, 1), got {opts['heavy_frac']}")

    # ------------------------------------------------------------------ levels
    def level_for_keep(self, keep, n, opts):
        if keep >= 1.0:
            return {"exact": True}  # every token, exactly (issue 15 item 9)
        B = max(1, int(round(keep * n)))
        level = {"keep": float(keep)}
        if opts["estimator"] == "cluster":
            sink = min(opts["sink"], max(0, B - 1), n - 1)
            window = min(int(round(opts["window_frac"] * B)), max(0, B - sink - 1), n - sink - 1)
            # (the heavy hitters take at most heavy_frac of what the window leaves, and need the sizes to be the
            # budget's: the offline sketch with its t chosen here; a fixed t or online clusters keep their slots)
            heavy = min(int(round(opts["heavy_frac"] * B)), max(0, B - sink - window - 1), n - sink - window - 1)
            heavy = heavy if opts["variant"] == "offline" and opts["t"] is None else 0
            level.update(sink=int(sink), window=int(window), s_num=0)
            b_den = max(1, B - sink - window)
            n_sk = n - sink - window
            if heavy > 0:  # (with queries: exact heavy hitters, the sample has the rest; without: the sample has it)
                hl = self._sample_level(opts, n_sk - heavy, b_den - heavy)
                level.update(heavy=int(heavy), **{"heavy_" + k: v for k, v in hl.items()})
        else:
            s_num = opts["s_num"] if opts["s_num"] is not None else max(1, int(round(opts["num_frac"] * B)))
            level["s_num"] = int(s_num)
            b_den = max(1, B - s_num)
            n_sk = n
        level.update(self._sample_level(opts, n_sk, b_den))
        return level

    @staticmethod
    def _sample_level(opts, n_sk: int, b_den: int) -> dict:
        """The sketch's sizes for ``b_den`` slots over ``n_sk`` tokens: ``m`` and ``t`` (offline), else ``t`` or
        the slot budget ``den_budget`` that the prompt's clusters share."""
        if opts["variant"] == "offline":
            m = min(centres(opts), n_sk, b_den)
            return dict(m=int(m), t=int(opts["t"] if opts["t"] is not None else max(1, b_den // m)))
        if opts["t"] is not None:
            return dict(t=int(opts["t"]))
        return dict(den_budget=int(b_den))

    def levels(self, n, opts):
        out, seen, j = [], set(), 1
        while round(n * 2.0**-j) >= 2:
            lv = self.level_for_keep(2.0**-j, n, opts)
            sig = tuple(sorted((k, v) for k, v in lv.items() if k != "keep"))
            if sig not in seen:
                seen.add(sig)
                out.append(lv)
            j += 1
        return out

    # ------------------------------------------------------------------ build
    def _thresholds(self, K, ctx, estimator="l2"):
        H = K.shape[0]
        m = centres(ctx.opts, estimator)
        if ctx.opts["threshold"] is not None:
            return np.full(H, float(ctx.opts["threshold"]))
        gkc = resolve("greedy_k_center", ctx.backend)
        if is_torch(K):  # every head at once, on the device
            return np.asarray(gkc(ctx.scale * K, m)[2].amax(dim=-1).tolist())
        return np.asarray([gkc(fold_scale(K[h], ctx.scale), m)[2].max() for h in range(H)])

    def _clusterings(self, K, ctx, m=None):
        """Per head ``(clusters, largest cluster radius, cluster sizes)`` of the clustering the level uses
        (deterministic; torch: every head at once on the device, the sizes as a tensor)."""
        out = []
        if is_torch(K):
            backend = "torch" if ctx.backend == "reference" else ctx.backend
            if ctx.opts["variant"] == "offline":
                _, assign, dist = resolve("greedy_k_center", backend)(ctx.scale * K, m)
            else:
                thr = torch.as_tensor(self._thresholds(K, ctx), device=K.device)
                _, assign, dist = resolve("online_clusters", backend)(ctx.scale * K, thr)
            for h in range(K.shape[0]):
                sizes = torch.bincount(assign[h])
                out.append((int(sizes.numel()), float(dist[h].max()), sizes))
            return out
        if ctx.opts["variant"] == "offline":
            gkc = resolve("greedy_k_center", ctx.backend)
            for h in range(K.shape[0]):
                _, assign, dist = gkc(fold_scale(K[h], ctx.scale), m)
                out.append((int(assign.max()) + 1, float(dist.max()), np.bincount(assign)))
        else:
            thr = self._thresholds(K, ctx)
            onc = resolve("online_clusters", ctx.backend)
            for h in range(K.shape[0]):
                _, assign, dist = onc(fold_scale(K[h], ctx.scale), thr[h])
                out.append((int(assign.max()) + 1, float(dist.max()), np.bincount(assign)))
        return out

    @staticmethod
    def _theorem_scalars(K, V, probes, scale):
        """Per head ``(min over probes of ||Attn(q)|| / (||softmax(q)||_2 ||V||_op), largest probe norm, ||V||_op,
        stable rank of V)`` on the path of ``K`` (``ratio = inf`` when ``V = 0``: every estimate is exactly 0)."""
        out = []
        if is_torch(K):
            dt = torch.float64 if K.dtype == torch.float64 else torch.float32
            Kd, Vd, Pd = K.to(dt), V.to(dt), probes.to(dt)
            p = torch.softmax(scale * (Pd @ Kd.transpose(-1, -2)), dim=-1)  # (H, p, n)
            exact = p @ Vd
            for h in range(K.shape[0]):
                op = float(torch.linalg.matrix_norm(Vd[h], 2))
                if op == 0.0:
                    out.append((math.inf, 0.0, 0.0, 0.0))
                    continue
                ratio = torch.linalg.vector_norm(exact[h], dim=-1) / (torch.linalg.vector_norm(p[h], dim=-1) * op)
                srank = float((Vd[h] * Vd[h]).sum()) / op**2
                out.append((float(ratio.min()), float(torch.linalg.vector_norm(Pd[h], dim=-1).max()), op, srank))
            return out
        exact = ra.attention(probes, K, V, scale)
        for h in range(K.shape[0]):
            a = scale * probes[h] @ K[h].T
            p = np.exp(a - a.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            op = float(np.linalg.norm(V[h], 2))
            if op == 0.0:
                out.append((math.inf, 0.0, 0.0, 0.0))
                continue
            ratio = np.linalg.norm(exact[h], axis=-1) / (np.linalg.norm(p, axis=-1) * op)
            out.append((float(ratio.min()), float(np.linalg.norm(probes[h], axis=-1).max()), op, stable_rank(V[h])))
        return out

    def build_reference(self, K, V, level, ctx):
        return self._build(K, V, level, ctx)

    def build_torch(self, K, V, level, ctx):
        return self._build(K, V, level, ctx)

    def _build(self, K, V, level, ctx):
        H, n, _ = K.shape
        tp = is_torch(K)
        positions = torch.arange(n, device=K.device) if tp else np.arange(n)
        if level.get("exact"):
            cl = (lambda x: x.clone()) if tp else (lambda x: x.copy())
            return Built([exact_segment(cl(K), cl(V), positions)], info={"exact": True, "kept": n})
        o = ctx.opts
        est = o["estimator"] if "sink" in level else "l2"
        sink, window = int(level.get("sink", 0)), int(level.get("window", 0))
        Ks, Vs = K[:, sink : n - window], V[:, sink : n - window]
        heavy = int(level.get("heavy", 0)) if est == "cluster" and ctx.queries_given else 0
        hv = rest = None
        if heavy:  # exact heavy hitters; the sample stands for the rest of the middle, at its own sizes
            level = {**level, **{k[len("heavy_") :]: v for k, v in level.items() if k.startswith("heavy_")}}
            top = top_tokens(self.heavy_scores(K, ctx)[:, sink : n - window], heavy)  # (H, heavy), from the sink
            rest = _complement(top, int(Ks.shape[1]))
            hv = (gather_tokens(Ks, top), gather_tokens(Vs, top), top + sink)
            Ks, Vs = gather_tokens(Ks, rest), gather_tokens(Vs, rest)
        # a reservoir holds at most the tokens it samples from: t and s_num are capped by the middle's size
        # (t = 10**9 would otherwise allocate 10**9 slots per cluster)
        nm = max(1, int(Ks.shape[1]))
        s_num = min(int(level["s_num"]), nm)
        unit = _unit(Vs)
        info: dict = {"variant": o["variant"], "estimator": est, "s_num": s_num, "sink": sink, "window": window}
        info["heavy"] = heavy
        backend = "torch" if tp and ctx.backend == "reference" else ctx.backend
        kw = dict(s_num=s_num, scale=ctx.scale, rng=ctx.rng, estimator=est, unit=unit)
        if o["variant"] == "offline":
            state = resolve("subgen_offline", backend)(Ks, Vs, t=min(int(level["t"]), nm), m=level["m"], **kw)
        else:
            thr = self._thresholds(Ks, ctx, est)
            if "t" in level:
                t = (
                    [min(int(x), nm) for x in level["t"]]
                    if isinstance(level["t"], (list, tuple))
                    else min(int(level["t"]), nm)
                )
            else:
                onc = resolve("online_clusters", backend)
                if tp:
                    cent = onc(ctx.scale * Ks, torch.as_tensor(thr, device=K.device))[0]
                    clusters = (cent >= 0).sum(-1).tolist()
                else:
                    clusters = [int(onc(fold_scale(Ks[h], ctx.scale), thr[h])[0].size) for h in range(H)]
                t = [max(1, level["den_budget"] // c) for c in clusters]
            state = resolve("subgen_stream", backend)(Ks, Vs, t=t, threshold=thr, **kw)
            info["threshold"] = thr.tolist()
        if rest is not None:
            state.remap_positions(rest)  # the sketch's tokens at their positions in the middle
        if centres(o, est) == 1:
            one_stratum(state)
        cl = (lambda x: x.clone()) if tp else (lambda x: x.copy())
        sinks = (cl(K[:, :sink]), cl(V[:, :sink]), cl(positions[:sink])) if sink else None
        win = (cl(K[:, n - window :]), cl(V[:, n - window :]), cl(positions[n - window :])) if window else None
        stream = SubGenStream(state, ctx.rng, sinks=sinks, window=win, window_size=window, offset=sink, heavy=hv)
        segs = stream.segments()
        if tp:
            info.update(t=state.ts, clusters=state.m, cluster_radius=state.cluster_radius())
        else:
            info.update(
                t=[h.t for h in state.heads],
                clusters=[h.m for h in state.heads],
                cluster_radius=[h.cluster_radius for h in state.heads],
            )
        kept = 0
        for sg in segs:
            c = sg.valid().sum(-1)
            kept = kept + np.asarray(c.tolist() if tp else c)
        info.update(kept=np.asarray(kept).tolist(), state_floats=np.asarray(state.stored_floats()).tolist())
        exact = Built([exact_segment(cl(K), cl(V), positions)], info={**info, "exact": True, "kept": n})
        if Built(segs, stream).held_nbytes() >= held_nbytes(exact.segments):
            return exact  # never larger than the exact cache (issue 15 item 8): store every token instead
        if est == "l2":
            flag_probe_error(info, probe_error(segs, K, V, ctx.probes, ctx.scale), self.name)
        return Built(segs, stream=stream, info=info)

    # ------------------------------------------------------------------ under a memory cap
    supports_cap = True

    def build_capped(self, K, V, cap, ctx):
        """SubGen under a cap (the ``cluster`` estimator with one stratum, ``variant="offline"``): the first
        ``sink`` tokens (at most ``cap / 8``) and an exact recent window of ``round(window_frac * cap)``
        tokens, the rest of the cap a reservoir of ``t`` weighted samples of every older token
        (``log w = log(n_c / t)``). A prompt shorter than the sinks and the window starts the reservoir with
        the first tokens that leave the window. Memory is the cap from the first token on."""
        o = ctx.opts
        if o["estimator"] != "cluster" or o["variant"] != "offline" or centres(o) != 1:
            raise ValueError("cap: subgen's capped policy is estimator='cluster' with one stratum (m=1, offline)")
        H, n, _ = K.shape
        tp = is_torch(K)
        cap = int(cap)
        sink = min(int(o["sink"]), cap // 8, n)
        W = max(0, min(int(round(o["window_frac"] * cap)), cap - sink - 1))
        t = cap - sink - W
        w0 = min(W, n - sink)
        unit = _unit(V)
        backend = "torch" if tp and ctx.backend == "reference" else ctx.backend
        offline = resolve("subgen_offline", backend)

        def factory(Ks, Vs):
            return one_stratum(
                offline(Ks, Vs, t=t, m=1, s_num=0, scale=ctx.scale, rng=ctx.rng, estimator="cluster", unit=unit)
            )

        positions = torch.arange(n, device=K.device) if tp else np.arange(n)
        cl = (lambda x: x.clone()) if tp else (lambda x: x.copy())
        state = factory(K[:, sink : n - w0], V[:, sink : n - w0]) if n - w0 > sink else None
        sinks = (cl(K[:, :sink]), cl(V[:, :sink]), cl(positions[:sink])) if sink else None
        win = (cl(K[:, n - w0 :]), cl(V[:, n - w0 :]), cl(positions[n - w0 :])) if w0 else None
        stream = SubGenStream(state, ctx.rng, sinks=sinks, window=win, window_size=W, offset=sink, factory=factory)
        info = {"cap": cap, "sink": sink, "window": W, "t": t, "estimator": "cluster", "variant": "offline"}
        return Built(stream.segments(), stream=stream, info=info)

    # ------------------------------------------------------------------ theorem
    def theorem_level(self, K, V, eps, ctx):
        """[SUB] Thm 2.4 with the constants of ``proofs/subgen.md``, per probe query.

        The theorem bounds ``||z - Attn||`` by ``eps' ||softmax||_2 ||V||_op``; to certify the
        relative error ``eps`` on head ``h`` we use ``eps'_h = eps * min_q ||Attn(q)|| /
        (||softmax(q)||_2 ||V_h||_op)`` over the probes (``<= eps``), ``r_h`` = the largest probe
        norm, ``rho_h`` and ``m_h`` from the (deterministic) clustering of the level, failure
        probability ``ctx.delta`` per query. One level serves all heads (largest ``t`` and
        ``s_num``); ``None`` (exact) when some head would keep every token anyway.
        """
        H, n, _ = K.shape
        opts = ctx.opts
        m = min(centres(opts, "l2"), n)
        clus = self._clusterings(K, ctx, m)
        T, S = 1, 1
        for h, (ratio, r, op, srank) in enumerate(self._theorem_scalars(K, V, ctx.probes, ctx.scale)):
            if op == 0.0:
                continue  # V = 0: every estimate is exactly 0
            eps_h = eps * ratio
            if eps_h <= 0.0:
                return None
            clusters, radius, _ = clus[h]
            t, s = subgen_sample_sizes(min(eps_h, 1.0), r, radius, clusters, srank, ctx.delta)
            T, S = max(T, t), max(S, s)
        if not np.isfinite(T):
            return None
        for _, _, sizes in clus:
            held = sizes.clamp(max=T).sum() if is_torch(sizes) else np.minimum(sizes, T).sum()
            if S + int(held) >= n:
                return None
        level = {"t": int(T), "s_num": int(S)}
        if opts["variant"] == "offline":
            level["m"] = int(m)
        return level
