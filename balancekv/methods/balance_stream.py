"""``balance-stream``: theory-faithful streaming BalanceKV [BKV, Alg. 1, Thm 3.1 / 3.4] (SPEC 4a).

Per head:

- numerator instances, one :class:`~balancekv.reference.merge_reduce.MergeAndReduce`
  per value-norm bucket ``i`` (``2^(i-1) <= ||v|| < 2^i``, so the norms inside
  one walk are within a factor 2, as the halving guarantee needs), fed ``(k, v)``;
- one denominator instance fed ``(k, 1)``;
- tokens with ``v = 0`` contribute nothing to the numerator and enter no numerator
  instance.

Bucket erasure (only when the stream has a precision ``eps``, i.e. under
``guarantee="theorem"``): a token is erased from the numerator iff adding its
squared norm keeps the erased squared norm within ``(eps/2)^2`` of the total
squared value norm seen so far. Small-norm buckets fill this budget first in
practice; the rule (not the paper's threshold ``(eps/2n) e^{-scale r^2} v_max``,
which depends on the final ``n``) is what the proof needs: by Cauchy–Schwarz the
erased tokens move the output by at most ``(eps/2) ||softmax||_2 ||V||_F``, and
the budget only grows as the stream goes on (``proofs/merge_reduce.md``).

The estimate is two-set (SPEC section 1): numerator slots carry ``num_logw =
log w`` and ``den_logw = -inf``, denominator slots the reverse.

Levels: ``{"t": t}`` (the batch size) for ``t = 2^j`` from ``n/4`` down to 2;
``level_for_keep(keep)`` picks the largest ``t`` whose predicted slot count (one
numerator instance per occupied bucket plus the denominator, see
:func:`predicted_slots`) is at most ``keep * n``; the result reports the true
count. The walk threshold is ``c = 30 log(|merged| / delta)`` unless the option
``c`` is given. A walk FAIL is retried ``max_retries`` times with fresh uniforms,
then the merged set is kept exactly (``Built.info["retries"]``/``["fallbacks"]``).
"""

from __future__ import annotations

import numpy as np

from balancekv.bounds.balance import balance_stream_theorem_t, value_norm_bucket
from balancekv.reference.merge_reduce import MergeAndReduce

from ..storage import dense_segment
from .base import Built, Method, check_float_option, check_int_option


def predicted_slots(n: int, t: int, instances: int) -> int:
    """Slots of ``instances`` MergeAndReduce instances of ``~n`` tokens each, assuming exact halving:
    ``t * popcount(n // t) + n % t`` per instance."""
    return instances * (t * bin(n // t).count("1") + n % t)


class BalanceKVStream:
    """Decode-time BalanceKV state for ``H`` heads; ``append(k, v, pos)`` returns all current segments."""

    def __init__(
        self,
        H: int,
        d: int,
        s: int,
        *,
        t: int,
        scale: float,
        rng: np.random.Generator,
        c: float | None = None,
        delta: float = 0.01,
        max_retries: int = 3,
        eps: float | None = None,
    ):
        self.H, self.d, self.s, self.t = H, d, s, int(t)
        self.kw = dict(scale=scale, rng=rng, c=c, delta=delta, max_retries=max_retries)
        self.eps = eps
        self.num = [dict() for _ in range(H)]  # bucket -> MergeAndReduce
        self.den = [MergeAndReduce(self.t, d, 1, **self.kw) for _ in range(H)]
        self.total_sq = np.zeros(H)
        self.erased_sq = np.zeros(H)
        self.erased = [[] for _ in range(H)]  # positions erased from the numerator

    def _add(self, h: int, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        self.den[h].add(k, np.ones(1), pos)
        nv2 = float(v @ v)
        self.total_sq[h] += nv2
        if nv2 == 0.0:
            return
        if self.eps is not None and self.erased_sq[h] + nv2 <= (self.eps / 2) ** 2 * self.total_sq[h]:
            self.erased_sq[h] += nv2
            self.erased[h].append(int(pos))
            return
        b = int(value_norm_bucket(np.sqrt(nv2)))
        inst = self.num[h].get(b)
        if inst is None:
            inst = self.num[h][b] = MergeAndReduce(self.t, self.d, self.s, **self.kw)
        inst.add(k, v, pos)

    def extend(self, K: np.ndarray, V: np.ndarray, positions) -> None:
        """Feed tokens ``K (H, m, d)``, ``V (H, m, s)`` in stream order (token by token)."""
        positions = np.asarray(positions, np.int64)
        for j in range(K.shape[1]):
            for h in range(self.H):
                self._add(h, K[h, j], V[h, j], int(positions[j]))

    def append(self, k, v, pos):
        self.extend(np.asarray(k, np.float64), np.asarray(v, np.float64), pos)
        return self.segments()

    # ------------------------------------------------------------------ views
    def head_slots(self, h: int):
        """``(K, V, num_logw, den_logw, positions)`` of head ``h``."""
        Ks, Vs, nl, dl, ps = [], [], [], [], []
        for b in sorted(self.num[h]):
            K, V, p, lw = self.num[h][b].contents()
            Ks.append(K), Vs.append(V), nl.append(lw), dl.append(np.full(lw.shape, -np.inf)), ps.append(p)
        K, _, p, lw = self.den[h].contents()
        # denominator slots need only keys; the value stored there is never read (weight -inf)
        Ks.append(K), Vs.append(np.zeros((K.shape[0], self.s))), nl.append(np.full(lw.shape, -np.inf))
        dl.append(lw), ps.append(p)
        return tuple(np.concatenate(x, axis=0) for x in (Ks, Vs, nl, dl, ps))

    def segments(self):
        heads = [self.head_slots(h) for h in range(self.H)]
        m = max(1, max(x[0].shape[0] for x in heads))
        K = np.zeros((self.H, m, self.d))
        V = np.zeros((self.H, m, self.s))
        nl = np.full((self.H, m), -np.inf)
        dl = np.full((self.H, m), -np.inf)
        pos = np.full((self.H, m), -1, np.int64)
        for h, (k, v, a, b, p) in enumerate(heads):
            j = k.shape[0]
            K[h, :j], V[h, :j], nl[h, :j], dl[h, :j], pos[h, :j] = k, v, a, b, p
        return [dense_segment(K, V, nl, dl, pos, "balance-stream")]

    @property
    def retries(self) -> int:
        return sum(i.retries for h in range(self.H) for i in [*self.num[h].values(), self.den[h]])

    @property
    def fallbacks(self) -> int:
        return sum(i.fallbacks for h in range(self.H) for i in [*self.num[h].values(), self.den[h]])

    def memory(self) -> np.ndarray:
        """Stored tokens per head (all instances)."""
        return np.array([sum(i.size for i in self.num[h].values()) + self.den[h].size for h in range(self.H)])


class BalanceStream(Method):
    name = "balance-stream"
    defaults = {"c": None, "max_retries": 3}
    has_theorem = True

    def check_options(self, opts):
        if opts["c"] is not None:
            check_float_option(opts, "c", 0.0, lo_open=True)
        check_int_option(opts, "max_retries", 0)

    def levels(self, n, opts):
        out, t = [], 1 << max(1, int(np.floor(np.log2(max(n, 2)))) - 2)
        while t >= 2:
            out.append({"t": int(t)})
            t //= 2
        return out

    def level_for_keep(self, keep, n, opts):
        return {"keep": float(keep)}

    def _t_for_keep(self, keep, V):
        n = V.shape[1]
        vn = np.linalg.norm(V, axis=-1)
        b = value_norm_bucket(vn)
        inst = max(len(np.unique(b[h][vn[h] > 0])) for h in range(V.shape[0])) + 1
        best = 1
        for t in range(1, n + 1):
            if predicted_slots(n, t, inst) <= keep * n:
                best = t
        return best

    def build_reference(self, K, V, level, ctx):
        H, n, d = K.shape
        s = V.shape[-1]
        t = level["t"] if "t" in level else self._t_for_keep(level["keep"], V)
        stream = BalanceKVStream(
            H,
            d,
            s,
            t=t,
            scale=ctx.scale,
            rng=ctx.rng,
            c=ctx.opts["c"],
            delta=ctx.delta,
            max_retries=ctx.opts["max_retries"],
            eps=level.get("eps"),
        )
        stream.extend(K, V, np.arange(n))
        segs = stream.segments()
        return Built(
            segs,
            stream=stream,
            info={"t": t, "kept": int(stream.memory().max()), "retries": stream.retries, "fallbacks": stream.fallbacks},
        )

    def theorem_level(self, K, V, eps, ctx):
        """Smallest ``t`` certified by Thm 3.1 [BKV] (our constants) for every head, or ``None`` (exact).

        The guarantee is Eq. 2 for queries with ``||q|| <= r``, ``r`` the largest key or probe norm.
        """
        r = float(max(np.linalg.norm(K, axis=-1).max(), np.linalg.norm(ctx.probes, axis=-1).max()))
        ts = []
        for h in range(K.shape[0]):
            t = balance_stream_theorem_t(K[h], V[h], eps, scale=ctx.scale, r=r, delta=ctx.delta, c=ctx.opts["c"])
            if t is None:
                return None
            ts.append(t)
        return {"t": int(max(ts)), "eps": float(eps)}
