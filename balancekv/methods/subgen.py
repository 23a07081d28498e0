"""``subgen``: SubGen [SUB] — online key clustering for the denominator, l2 value sampling for the numerator.

A two-set method (SPEC sections 1 and 5): numerator slots carry
``num_logw = log(mu / (s_num ||v||^2))``, denominator slots ``den_logw = log(n_c / t)``
(0 for members of clusters with at most ``t`` members, kept exactly). A token drawn
by several slots is stored once with summed weights; heads keep different numbers
of slots and are padded. The definition is :mod:`balancekv.reference.subgen`; with
``backend`` torch/triton/auto the clustering and sampling run in :mod:`balancekv.fast.subgen`
(same uniforms, same state), decoding appends through the reference update.

Options
-------
variant : ``"offline"`` (default; greedy k-centre with ``m`` centres, what [SUB]'s
    experiments ran) or ``"stream"`` (online threshold clustering, [SUB] Thm 2.4).
m : number of centres of the offline variant (default 16; at most the budget allows);
    with ``variant="stream"`` and ``threshold=None`` it sets the automatic threshold.
threshold : stream clustering radius on folded keys ``scale * k``; ``None`` (default):
    per head, the radius of greedy k-centre with ``m`` centres on the prompt's keys.
    (Named ``threshold``, not ``delta``: ``compress``'s ``delta`` is the failure probability.)
num_frac : share of the kept budget given to numerator slots (default 0.5).
t, s_num : fix the reservoir slots per cluster / the numerator slots at every level
    (default ``None``: derived from the budget).

Budget split for a kept fraction ``keep`` (``B = round(keep * n)`` slots):
``s_num = round(num_frac * B)`` numerator slots and ``B_den = B - s_num`` denominator
slots, ``t = B_den // m`` per cluster (offline: ``m`` capped at ``B_den``; stream: ``m`` is
each head's actual number of prompt clusters, so ``t`` may differ per head). Kept
tokens are at most ``s_num + sum_c min(n_c, t) <= B`` (fewer after merging duplicates),
unless a stream head has more clusters than ``B_den`` (then ``t = 1`` and it keeps one
slot per cluster; ``info["kept"]`` reports the truth). Not billed in ``nbytes``: the
``m`` centres (``m * d`` floats) and counts the stream needs to keep compressing
during decoding; ``info["state_floats"]`` reports them.
"""

from __future__ import annotations

import numpy as np

from balancekv.backends import resolve
from balancekv.bounds.subgen import stable_rank, subgen_sample_sizes
from balancekv.reference import softmax_attention as ra
from balancekv.reference.subgen import SubGenState, fold_scale

from ..storage import dense_segment
from .base import Built, Method, check_float_option, check_int_option

VARIANTS = ("offline", "stream")


def state_segments(state: SubGenState):
    pos, K, V, nl, dl = state.padded()
    return [dense_segment(K, V, nl, dl, pos, "subgen")]


class SubGenStream:
    """Decode-time state: every appended token goes through SubGen's update (memory stays flat)."""

    def __init__(self, state: SubGenState, rng: np.random.Generator):
        self.state, self.rng = state, rng

    def append(self, k, v, pos):
        self.state.append(k, v, pos, rng=self.rng)
        return state_segments(self.state)


class SubGen(Method):
    name = "subgen"
    defaults = {"variant": "offline", "m": 16, "threshold": None, "num_frac": 0.5, "t": None, "s_num": None}
    has_theorem = True

    def check_options(self, opts):
        if opts["variant"] not in VARIANTS:
            raise ValueError(f"option variant must be one of {VARIANTS}, got {opts['variant']!r}")
        check_int_option(opts, "m", 1)
        if opts["threshold"] is not None:
            check_float_option(opts, "threshold", 0.0)
        check_float_option(opts, "num_frac", 0.0, 1.0, lo_open=True)
        if opts["num_frac"] >= 1.0:
            raise ValueError(f"option num_frac must lie in (0, 1), got {opts['num_frac']}")
        for name in ("t", "s_num"):
            if opts[name] is not None:
                check_int_option(opts, name, 1)

    # ------------------------------------------------------------------ levels
    def level_for_keep(self, keep, n, opts):
        B = max(1, int(round(keep * n)))
        s_num = opts["s_num"] if opts["s_num"] is not None else max(1, int(round(opts["num_frac"] * B)))
        b_den = max(1, B - s_num)
        level = {"keep": float(keep), "s_num": int(s_num)}
        if opts["variant"] == "offline":
            m = min(opts["m"], n, b_den)
            level.update(m=int(m), t=int(opts["t"] if opts["t"] is not None else max(1, b_den // m)))
        elif opts["t"] is not None:
            level["t"] = int(opts["t"])
        else:
            level["den_budget"] = int(b_den)
        return level

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
    def _thresholds(self, K, ctx):
        if ctx.opts["threshold"] is not None:
            return np.full(K.shape[0], float(ctx.opts["threshold"]))
        gkc = resolve("greedy_k_center", ctx.backend)
        return np.asarray([gkc(fold_scale(K[h], ctx.scale), ctx.opts["m"])[2].max() for h in range(K.shape[0])])

    def _clusterings(self, K, ctx, m=None):
        """Per head ``(assign, dist)`` of the clustering the level uses (deterministic)."""
        out = []
        if ctx.opts["variant"] == "offline":
            gkc = resolve("greedy_k_center", ctx.backend)
            for h in range(K.shape[0]):
                _, assign, dist = gkc(fold_scale(K[h], ctx.scale), m)
                out.append((assign, dist))
        else:
            thr = self._thresholds(K, ctx)
            onc = resolve("online_clusters", ctx.backend)
            for h in range(K.shape[0]):
                _, assign, dist = onc(fold_scale(K[h], ctx.scale), thr[h])
                out.append((assign, dist))
        return out

    def build_reference(self, K, V, level, ctx):
        H, n, _ = K.shape
        s_num = int(level["s_num"])
        info: dict = {"variant": ctx.opts["variant"], "s_num": s_num}
        if ctx.opts["variant"] == "offline":
            state = resolve("subgen_offline", ctx.backend)(
                K, V, t=level["t"], s_num=s_num, m=level["m"], scale=ctx.scale, rng=ctx.rng
            )
        else:
            thr = self._thresholds(K, ctx)
            if "t" in level:
                t = level["t"]
            else:
                onc = resolve("online_clusters", ctx.backend)
                clusters = [int(onc(fold_scale(K[h], ctx.scale), thr[h])[0].size) for h in range(H)]
                t = [max(1, level["den_budget"] // c) for c in clusters]
            state = resolve("subgen_stream", ctx.backend)(
                K, V, t=t, s_num=s_num, threshold=thr, scale=ctx.scale, rng=ctx.rng
            )
            info["threshold"] = thr.tolist()
        segs = state_segments(state)
        info.update(
            t=[h.t for h in state.heads],
            clusters=[h.m for h in state.heads],
            cluster_radius=[h.cluster_radius for h in state.heads],
            kept=np.count_nonzero(segs[0].valid(), axis=-1).tolist(),
            state_floats=state.stored_floats().tolist(),
        )
        return Built(segs, stream=SubGenStream(state, ctx.rng), info=info)

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
        m = min(opts["m"], n)
        clus = self._clusterings(K, ctx, m)
        exact = ra.attention(ctx.probes, K, V, ctx.scale)
        T, S = 1, 1
        for h in range(H):
            a = ctx.scale * ctx.probes[h] @ K[h].T
            p = np.exp(a - a.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            op = np.linalg.norm(V[h], 2)
            if op == 0.0:
                continue  # V = 0: every estimate is exactly 0
            ratio = np.linalg.norm(exact[h], axis=-1) / (np.linalg.norm(p, axis=-1) * op)
            eps_h = eps * float(ratio.min())
            if eps_h <= 0.0:
                return None
            r = float(np.linalg.norm(ctx.probes[h], axis=-1).max())
            assign, dist = clus[h]
            t, s = subgen_sample_sizes(
                min(eps_h, 1.0), r, float(dist.max()), int(assign.max()) + 1, stable_rank(V[h]), ctx.delta
            )
            T, S = max(T, t), max(S, s)
        if not np.isfinite(T):
            return None
        for assign, _ in clus:
            sizes = np.bincount(assign)
            if S + np.minimum(sizes, T).sum() >= n:
                return None
        level = {"t": int(T), "s_num": int(S)}
        if opts["variant"] == "offline":
            level["m"] = int(m)
        return level
