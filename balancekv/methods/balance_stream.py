"""``balance-stream``: streaming BalanceKV [BKV, Alg. 1, Thm 3.1 / 3.4] (SPEC 4a).

Two variants (option ``variant``):

- ``"joint"`` (default, measured best on real caches): :class:`JointBalanceStream`, MergeAndReduce
  with joint balancing (one weighted set), fixed-size halving, a fixed batch size ``t`` (default
  64), a counter capped at ``rounds`` levels, and exact sinks and recent window; compress time
  ``O(n t)``. ``keep`` picks ``rounds`` and ``t``, the budget left goes to the exact window.
  With observed ``queries``, ``heavy_frac`` of the budget (default 0.3, chosen on the tuning text) holds
  exact heavy hitters: the first middle tokens seed the heavy slots, scored by their summed probe
  attention (balance's scores), and each block leaving the window competes with them, so the slots end
  with the middle's top-scored tokens and every other token goes through the sets once; decode
  attention (:meth:`JointBalanceStream.observe`) adds to the scores. On real caches the attention
  reads single middle tokens that a halving weights by ``2^level`` or drops (``benchmarks/README.md``,
  session 9). Without queries that share goes to the sets and the window.
- ``"theory"``: the theory-faithful algorithm below (also what ``guarantee="theorem"`` runs).

Both run on the caller's device for torch input (:mod:`balancekv.fast.merge_reduce`, the torch
walks; same uniforms, so float64 builds keep the reference's tokens and weights). ``keep=1``
stores every token exactly; a result larger than the exact cache is the exact cache.

The theory variant, per head:

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
log w`` and ``den_logw = -inf`` (or the guard weight ``GUARD / #numerator slots`` when the token is
not in the denominator set: relative bias ``<= 1e-12``, and ``|z(q)|`` stays bounded, so no overflow
at any key norm), denominator slots the reverse. Its probe error is measured at build; above 1 it is
flagged (``info["unreliable_heads"]``) with an :class:`~balancekv.methods.base.UnreliableEstimateWarning`.
Its decode state (the instances) holds the kept tokens besides the cache's padded slots.

Levels: ``{"t": t}`` (the batch size) for ``t = 2^j`` from ``n/4`` down to 2;
``level_for_keep(keep)`` picks the largest ``t`` whose predicted slot count (one
numerator instance per occupied bucket plus the denominator, see
:func:`predicted_slots`) is at most ``keep * n``; the result reports the true
count. The walk threshold is ``c = 30 log(|merged| / delta)`` unless the option
``c`` is given. A walk FAIL is retried ``max_retries`` times with fresh uniforms,
then the merged set is kept exactly (``Built.info["retries"]``/``["fallbacks"]``).
"""

from __future__ import annotations

import math

import numpy as np

from balancekv.backends import resolve
from balancekv.bounds.balance import balance_stream_theorem_t, value_norm_bucket
from balancekv.reference.merge_reduce import MergeAndReduce

from .._arrays import held_nbytes, host_uniforms, is_torch, torch
from ..storage import dense_segment, exact_segment
from .base import Built, Method, check_float_option, check_int_option, flag_probe_error, probe_error

VARIANTS = ("joint", "theory")

#: relative weight of the numerator slots in the denominator of the two-set (``theory``) estimate
GUARD = 1e-12


def _xp(torch_path: bool):
    return torch if torch_path else np


def _np_scaled_norms(V: np.ndarray) -> np.ndarray:
    """``||v||_2`` over the last axis without overflow (``m * ||v / m||``, ``m = max |v|``)."""
    m = np.max(np.abs(V), axis=-1, keepdims=True)
    safe = np.where(m > 0, m, 1.0)
    return (safe * np.linalg.norm(V / safe, axis=-1, keepdims=True))[..., 0]


def joint_slots(n: int, t: int, rounds: int, sink: int, window: int = 0) -> int:
    """Slots of :class:`JointBalanceStream` after ``n`` tokens (deterministic: every halving keeps
    exactly half): ``sink`` exact, the exact recent buffer (``window`` to ``window + t - 1`` tokens
    once the stream is that long), one set of ``t`` per occupied counter level below ``rounds`` and
    one per ``t 2^rounds`` tokens at the top level."""
    sink = min(sink, n)
    rest_n = n - sink
    blocks = max(0, (rest_n - window) // t)
    top, rest = divmod(blocks, 2**rounds)
    return sink + rest_n - blocks * t + t * (top + bin(rest).count("1"))


class JointBalanceStream:
    """Practical streaming BalanceKV (``variant="joint"``): MergeAndReduce with a capped counter.

    Grounded in [BKV] Alg. 1 (a binary counter of reduced sets, each merge halved by a
    discrepancy walk), with the changes that make it work on real caches (measured in
    ``benchmarks/README.md``, section "Streaming and sublinear methods"):

    - **joint balancing, one set** (SPEC 3): one walk per merge on the kernel
      ``exp(scale <k~_i, k~_j>) (<w_i (v_i - vbar), w_j (v_j - vbar)> + a2)`` (keys and values
      centred per merged set, the practical walk of SPEC 4b,
      :func:`~balancekv.reference.blocked_balance.blocked_walk_signs`), so numerator and
      denominator share their samples (a ratio estimator, ``num_logw == den_logw``) and no
      ``exp(Mn - Md)`` can blow up;
    - **fixed-size halving** (:func:`~balancekv.reference.blocked_balance.fixed_size_halving`):
      every merge of ``2t`` tokens keeps exactly ``t``, so all heads move in lockstep and the walks
      of all heads run as one batch;
    - **a batch size ``t`` that does not grow with ``n``** and a counter **capped at ``rounds``
      levels**: sets reaching level ``rounds`` (weight up to ``2^rounds``) are kept as they are, so
      the cache holds about ``n / 2^rounds`` tokens, and compressing costs ``O(n t)``;
    - the first ``sink`` tokens (attention sinks) stay exact, and so does the level-0 buffer (the
      most recent ``< t`` tokens).

    Randomness: each merge draws ``rng.random((H, 2t))`` (the walk's uniforms), on both paths.
    ``append(k, v, pos)`` feeds tokens in stream order and returns every current segment (views
    of the state: the cache shares them, nothing is copied twice).
    """

    def __init__(
        self,
        H,
        d,
        s,
        *,
        t,
        rounds,
        sink,
        scale,
        rng,
        like,
        backend="reference",
        walk=None,
        window=0,
        cap=None,
        heavy=0,
    ):
        self.H, self.d, self.s, self.t, self.rounds, self.sink = H, d, s, int(t), int(rounds), int(sink)
        self.window, self.heavy = int(window), int(heavy)
        #: memory cap (tokens per head), or None: see :func:`cap_layout` and :meth:`_enforce_cap`
        self.max_tokens, self.max_sets = None, None
        if cap is not None:
            self.rounds = 0  # no counter: a set is merged only when the cap needs it
            self.max_tokens = int(cap)
            self.max_sets = (self.max_tokens - self.sink - self.window - self.heavy - self.t + 1) // self.t
            if self.max_sets < 1:
                raise ValueError(
                    f"cap={cap} is too small for sink={sink}, window={window}, heavy={heavy} and t={t}: it needs at "
                    f"least {self.sink + self.window + self.heavy + 2 * self.t - 1} tokens"
                )
        self.top_n: list[int] = []  # tokens each set of ``top`` stands for (host ints, for the cap's merges)
        self.cap = self.window + self.t  # buffer capacity: the window plus one block
        self.scale, self.rng, self.backend = float(scale), rng, backend  # (like only gives kind and dtype)
        self.torch = is_torch(like)
        self.kind, self.compute_dtype = None, like.dtype  # storage kind (None: the compute dtype), see to_kind
        self.walk = {"gamma": 4.0, "temp": 1.0, "beta": 0.0, "a2": 0.025, "value_centering": True, **(walk or {})}
        self._signs = resolve("blocked_walk_signs", backend)
        self._halve = resolve("fixed_size_halving", backend)
        z = (
            (lambda *sh: torch.zeros(sh, dtype=like.dtype, device=like.device))
            if self.torch
            else (lambda *sh: np.zeros(sh))
        )
        self._z = z
        self.sink_kv = None  # (K, V, pos) of the sinks, filled as they arrive
        self.buf_k, self.buf_v = z(H, self.cap, d), z(H, self.cap, s)
        self.buf_pos = (
            torch.full((self.cap,), -1, dtype=torch.int64, device=like.device)
            if self.torch
            else np.full(self.cap, -1, np.int64)
        )
        self.nbuf = 0
        if self.heavy:  # exact heavy hitters by accumulated attention (see :meth:`observe`)
            Hh = self.heavy
            full = (
                (lambda sh, v, dt=like.dtype: torch.full(sh, v, dtype=dt, device=like.device))
                if self.torch
                else (lambda sh, v, dt=np.float64: np.full(sh, v, dtype=dt))
            )
            self.hv_k, self.hv_v = z(H, Hh, d), z(H, Hh, s)
            self.hv_lw, self.hv_score = full((H, Hh), -math.inf), z(H, Hh)
            self.hv_pos = full((H, Hh), -1, torch.int64 if self.torch else np.int64)
            self.buf_score = z(H, self.cap)
        self.levels: list = [None] * self.rounds  # (K, V, logw, pos) per level, logw/pos (H, t)
        self.top: list = []  # sets at level ``rounds``
        self.n_seen = 0
        self.reductions = 0

    # ------------------------------------------------------------------ storage
    def _held(self, x, which: int):
        """``x`` in the storage dtype of keys (``which=0``) or values (1): the cache's, after :meth:`to_kind`."""
        if self.kind is None:
            return x
        dt = self.kind.dtype if which == 0 else self.kind.value_dtype
        return x.to(dt) if self.torch else x.astype(dt, copy=False)

    def _compute(self, x):
        """A stored array in the dtype the walks compute in."""
        return x.to(self.compute_dtype) if self.torch else np.asarray(x, self.compute_dtype)

    def to_kind(self, kind) -> None:
        """Hold every token in the cache's storage dtypes (keys ``kind.dtype``, values ``kind.value_dtype``;
        weights in the compute dtype), once, after the build: the cache's segments are then the state itself,
        not converted copies (a bf16 model's cache holds bf16 tokens once). Walks cast a merged pair up."""
        if kind.is_torch != self.torch:
            raise TypeError("a stream's state stays on its path (torch or NumPy)")
        self.kind = kind
        kv = lambda X: tuple(self._held(x, i) if i < 2 else x for i, x in enumerate(X))
        if self.sink_kv is not None:
            self.sink_kv = kv(self.sink_kv)
        self.buf_k, self.buf_v = self._held(self.buf_k, 0), self._held(self.buf_v, 1)
        self.levels = [None if x is None else kv(x) for x in self.levels]
        self.top = [kv(x) for x in self.top]
        if self.heavy:
            self.hv_k, self.hv_v = self._held(self.hv_k, 0), self._held(self.hv_v, 1)

    # ------------------------------------------------------------------ updates
    def append(self, k, v, pos):
        self.extend(k, v, pos)
        return self.segments()

    def seed(self, K, V, logw, pos, n_tokens: int):
        """Add an already weighted set ``K (H, m, d)``, ``V``, ``logw (H, m)``, ``pos (H, m)`` standing for
        the ``n_tokens`` stream tokens after the sinks (a prefill build; ``-inf`` slots are padding) as the
        oldest sets, in chunks of ``t`` slots. Call it after the sinks and before the recent tokens."""
        H, m = int(K.shape[0]), int(K.shape[1])
        t = self.t
        for a in range(0, m, t):
            # own storage per set (a view would keep the whole build alive after this set is merged)
            cp = (lambda x: x.clone()) if self.torch else (lambda x: x.copy())
            parts = [cp(x[:, a : a + t]) for x in (K, V, logw, pos)]
            parts[0], parts[1] = self._held(parts[0], 0), self._held(parts[1], 1)
            pad = t - int(parts[0].shape[1])
            if pad:
                if self.torch:
                    fill = [0.0, 0.0, -math.inf, -1]
                    parts = [
                        torch.cat([x, torch.full((H, pad) + tuple(x.shape[2:]), f, dtype=x.dtype, device=x.device)], 1)
                        for x, f in zip(parts, fill)
                    ]
                else:
                    parts = [
                        np.concatenate([x, np.full((H, pad) + x.shape[2:], f, dtype=x.dtype)], 1)
                        for x, f in zip(parts, [0.0, 0.0, -np.inf, -1])
                    ]
            w = parts[2].exp().sum(-1).mean() if self.torch else np.exp(parts[2]).sum(-1).mean()
            self._push(tuple(parts), self.rounds, count=max(1, round(float(w))))
        self.n_seen += int(n_tokens)

    def seed_heavy(self, K, V, pos, scores=None) -> None:
        """Hold tokens ``K (H, m, d)``, ``V``, ``pos (H, m)`` exactly in free heavy-hitter slots (accumulated score
        ``scores (H, m)``, default 0: the decode queries' attention decides from then on); ``m`` at most the free
        slots. A prompt under the
        cap is held exactly with them where the sets' room alone would have compressed it."""
        m = int(K.shape[1])
        if m == 0:
            return
        free = int(self.heavy) - int((self.hv_pos[0] >= 0).sum())
        if m > free:
            raise ValueError(f"seed_heavy: {m} tokens for {free} free heavy-hitter slots")
        a = self.heavy - free
        self.hv_k[:, a : a + m], self.hv_v[:, a : a + m] = self._held(K, 0), self._held(V, 1)
        self.hv_lw[:, a : a + m] = 0.0
        self.hv_pos[:, a : a + m] = pos
        self.hv_score[:, a : a + m] = 0.0 if scores is None else scores
        self.n_seen += m

    def extend(self, K, V, positions, scores=None):
        """Stream tokens ``K (H, T, d)``, ``V``, ``positions (T,)`` in. ``scores (H, T)``: with heavy-hitter slots,
        the tokens' starting accumulated scores (a prefill build's probe attention; default 0, decode attention
        then adds to them, :meth:`observe`)."""
        T = int(K.shape[1])
        j = 0
        if self.n_seen < self.sink:  # sinks first
            a = min(T, self.sink - self.n_seen)
            part = (K[:, :a], V[:, :a], positions[:a])
            part = (self._held(part[0], 0), self._held(part[1], 1), part[2])
            if self.sink_kv is None:
                self.sink_kv = tuple(x.clone() if self.torch else x.copy() for x in part)
            else:
                self.sink_kv = tuple(
                    (torch.cat if self.torch else np.concatenate)([x, y], -2 if i < 2 else -1)
                    for i, (x, y) in enumerate(zip(self.sink_kv, part))
                )
            j = a
            self.n_seen += a
        while j < T:
            a = min(T - j, self.cap - self.nbuf)
            self.buf_k[:, self.nbuf : self.nbuf + a] = K[:, j : j + a]
            self.buf_v[:, self.nbuf : self.nbuf + a] = V[:, j : j + a]
            self.buf_pos[self.nbuf : self.nbuf + a] = positions[j : j + a]
            if self.heavy and scores is not None:
                self.buf_score[:, self.nbuf : self.nbuf + a] = scores[:, j : j + a]
            self.nbuf += a
            self.n_seen += a
            j += a
            if self.nbuf == self.cap:  # the oldest block leaves the window for the counter
                t = self.t
                if self.torch:
                    pos = self.buf_pos[None, :t].expand(self.H, t).clone()
                    block = (self.buf_k[:, :t].clone(), self.buf_v[:, :t].clone(), self._z(self.H, t), pos)
                else:
                    pos = np.broadcast_to(self.buf_pos[:t], (self.H, t)).copy()
                    block = (self.buf_k[:, :t].copy(), self.buf_v[:, :t].copy(), np.zeros((self.H, t)), pos)
                if self.heavy:
                    block = self._through_heavy(block, self.buf_score[:, :t])
                for x in (self.buf_k, self.buf_v, *((self.buf_score,) if self.heavy else ())):
                    x[:, : self.window] = x[:, t:].clone() if self.torch else x[:, t:].copy()
                if self.heavy:
                    self.buf_score[:, self.window :] = 0
                self.buf_pos[: self.window] = self.buf_pos[t:].clone() if self.torch else self.buf_pos[t:].copy()
                self.nbuf = self.window
                # (a block whose tokens all went to free heavy-hitter slots leaves nothing to store)
                if not self.heavy or bool((block[3] >= 0).any()):
                    self._push(block, 0)

    def _through_heavy(self, block, score):
        """The block leaving the window competes with the heavy hitters: per head the ``heavy`` tokens of
        both with the largest accumulated attention stay (exact), the other ``t`` form the new set."""
        K, V, lw, pos = block
        xp = _xp(self.torch)
        cat = torch.cat if self.torch else np.concatenate
        valid = xp.isfinite(self.hv_lw)
        neg = torch.full_like(self.hv_score, -math.inf) if self.torch else -np.inf
        psc = cat([xp.where(valid, self.hv_score, neg), score], 1)
        pool = [cat(x, 1) for x in ((self.hv_k, K), (self.hv_v, V), (self.hv_lw, lw), (self.hv_pos, pos))]
        if self.torch:
            order = torch.argsort(-psc, dim=1, stable=True)
            take = lambda X, idx: torch.gather(X, 1, idx[..., None].expand(-1, -1, X.shape[-1]) if X.ndim == 3 else idx)
        else:
            order = np.argsort(-psc, axis=1, kind="stable")
            take = lambda X, idx: np.take_along_axis(X, idx[..., None] if X.ndim == 3 else idx, 1)
        top, rest = order[:, : self.heavy], order[:, self.heavy :]
        self.hv_k, self.hv_v, self.hv_lw, self.hv_pos = (take(x, top) for x in pool)
        sc = take(psc, top)
        self.hv_score = xp.where(xp.isfinite(sc), sc, torch.zeros_like(sc) if self.torch else 0.0)
        return tuple(take(x, rest) for x in pool)

    def observe(self, Q) -> None:
        """Add the attention of decode queries ``Q (H, mq, d)`` to the heavy hitters' and the window's
        accumulated scores (softmax over every held slot). Nothing without heavy hitters."""
        if not self.heavy:
            return
        if self.torch:
            lse_of, stack, exp = (lambda a: torch.logsumexp(a, -1)), torch.stack, torch.exp

            def logits(X, lw):
                return self.scale * (Q @ X.to(Q.dtype).transpose(-1, -2)) + lw.to(Q.dtype)[:, None, :]
        else:
            from scipy.special import logsumexp  # noqa: PLC0415  (reference path only)

            lse_of, stack, exp = (lambda a: logsumexp(a, -1)), np.stack, np.exp

            def logits(X, lw):
                return self.scale * (Q @ np.swapaxes(X, -1, -2)) + lw[:, None, :]

        lse = lse_of(stack([lse_of(logits(sg.keys.dense(), sg.num_logw)) for sg in self.segments()], -1))
        self.hv_score += exp(logits(self.hv_k, self.hv_lw) - lse[..., None]).sum(-2)
        b = self.nbuf
        if b:
            zero = self.hv_lw.new_zeros((self.H, b)) if self.torch else np.zeros((self.H, b))
            self.buf_score[:, :b] += exp(logits(self.buf_k[:, :b], zero) - lse[..., None]).sum(-2)

    def _push(self, block, level, count=None):
        """Add a set at counter ``level`` standing for ``count`` tokens (default ``t 2^level``)."""
        count = self.t * 2**level if count is None else int(count)
        while level < self.rounds and self.levels[level] is not None:
            other, self.levels[level] = self.levels[level], None
            block = self.reduce(other, block)
            level += 1
            count *= 2
        if level >= self.rounds:
            self.top.append(block)
            self.top_n.append(count)
            if self.max_sets is not None:
                self._enforce_cap()
        else:
            self.levels[level] = block

    def _enforce_cap(self):
        """Merge sets until at most ``max_sets`` remain: each time the two *adjacent* sets that stand for the
        fewest tokens together (ties: the oldest), so merged sets carry about equal weights, as
        MergeAndReduce's counter would give them, and the cache never holds more than the cap."""
        while len(self.top) > self.max_sets:
            tot = [a + b for a, b in zip(self.top_n, self.top_n[1:])]
            j = int(np.argmin(tot))
            self.top[j : j + 2] = [self.reduce(self.top[j], self.top[j + 1])]
            self.top_n[j : j + 2] = [tot[j]]

    def reduce(self, a, b):
        """Halve the merged set ``a + b`` (``2t`` tokens per head) to ``t`` per head."""
        cat = torch.cat if self.torch else np.concatenate
        K, V, lw, pos = (cat([x, y], 1) for x, y in zip(a, b))
        self.reductions += 1
        xp = _xp(self.torch)
        Kc, Vc = self._compute(K), self._compute(V)  # the walk computes in the compute dtype
        r = host_uniforms(self.rng, (self.H, 2 * self.t), Kc)
        # values near 1e154 would overflow the kernel's <v_i, v_j>: the walk sees v / u, u a power of two
        # per head (1 unless max |v| > 2^400, so ordinary caches are untouched)
        m = Vc.abs().amax(dim=(1, 2)) if self.torch else np.abs(Vc).max(axis=(1, 2))
        big = m > 2.0**400
        one = torch.ones_like(m) if self.torch else 1.0
        u = xp.where(big, xp.exp2(xp.ceil(xp.log2(xp.where(big, m, one)))), one)
        ok = xp.isfinite(lw)  # padding slots (lw = -inf, only in sets seeded from a prefill build) are not tokens
        signs = self._signs(Kc, Vc / u[:, None, None], r, weights=xp.exp(lw), scale=self.scale, **self.walk)
        keep, doubled = self._halve(signs, ok)
        # a head whose two sets hold at most t tokens together keeps them all (no halving needed)
        fits = (ok.sum(-1) <= self.t)[:, None]
        keep, doubled = xp.where(fits, ok, keep), doubled & ~fits
        t = self.t
        if self.torch:
            idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :t]  # kept slots first, in order
            kept = torch.gather(keep, 1, idx)
            dbl = torch.gather(doubled, 1, idx).to(lw.dtype)
            g = lambda X: torch.gather(X, 1, idx[..., None].expand(-1, -1, X.shape[-1]))
            nlw = torch.where(kept, torch.gather(lw, 1, idx) + math.log(2.0) * dbl, torch.full_like(dbl, -math.inf))
            npos = torch.where(kept, torch.gather(pos, 1, idx), torch.full_like(idx, -1))
            return g(K), g(V), nlw, npos
        idx = np.argsort(~keep, axis=1, kind="stable")[:, :t]
        kept = np.take_along_axis(keep, idx, 1)
        dbl = np.take_along_axis(doubled, idx, 1)
        g = lambda X: np.take_along_axis(X, idx[..., None], 1)
        nlw = np.where(kept, np.take_along_axis(lw, idx, 1) + np.log(2.0) * dbl, -np.inf)
        return g(K), g(V), nlw, np.where(kept, np.take_along_axis(pos, idx, 1), -1)

    # ------------------------------------------------------------------ views
    def segments(self):
        segs = []
        if self.sink_kv is not None:
            segs.append(exact_segment(*self.sink_kv, label="sink"))
        for K, V, lw, pos in [*self.top, *[x for x in reversed(self.levels) if x is not None]]:
            segs.append(dense_segment(K, V, lw, lw, pos, "balance-stream"))
        if self.heavy:
            segs.append(dense_segment(self.hv_k, self.hv_v, self.hv_lw, self.hv_lw, self.hv_pos, "heavy"))
        if self.nbuf:
            b = self.nbuf
            segs.append(exact_segment(self.buf_k[:, :b], self.buf_v[:, :b], self.buf_pos[:b], label="buffer"))
        return segs

    def memory(self) -> np.ndarray:
        """Tokens held per head (sinks, buffer, sets)."""
        n = min(self.sink, self.n_seen) + self.nbuf + self.t * (len(self.top) + sum(x is not None for x in self.levels))
        n += self.heavy
        return np.full(self.H, n)


def check_cap_options(opts: dict) -> None:
    """``cap_window`` and ``cap_heavy``: shares of a cap (``compress(..., cap=)``), each in [0, 1), sum < 1."""
    check_float_option(opts, "cap_window", 0.0, 1.0)
    check_float_option(opts, "cap_heavy", 0.0, 1.0)
    if opts["cap_window"] + opts["cap_heavy"] >= 1.0:
        raise ValueError(
            f"options cap_window + cap_heavy must be < 1 (shares of the cap), got {opts['cap_window']} + "
            f"{opts['cap_heavy']}"
        )


def cap_layout(
    cap: int,
    sink: int,
    t: int,
    window_frac: float,
    heavy_frac: float = 0.0,
    window_min: int = 0,
    t_div: int = 16,
    min_sets: int = 1,
) -> tuple[int, int, int, int]:
    """``(sink, window, heavy, t)`` of a :class:`JointBalanceStream` holding at most ``cap`` tokens per head:
    the sinks take at most an eighth of the cap, sets of ``t <= cap / t_div`` slots, an exact recent window of
    ``max(window_frac * cap, window_min)`` tokens, ``heavy_frac * cap`` exact heavy hitters, and room for at
    least one set (``sink + window + heavy + 2 t - 1 <= cap``; the window, then the heavy hitters give way);
    then ``t`` shrinks until the room left holds ``min_sets`` sets besides the buffer's block."""
    cap = int(cap)
    sink = min(int(sink), cap // 8)
    t = max(1, min(int(t), cap // int(t_div)))
    room = cap - sink - 2 * t + 1
    window = max(0, min(max(int(round(window_frac * cap)), int(window_min)), room))
    heavy = max(0, min(int(round(heavy_frac * cap)), room - window))
    t = max(1, min(t, (cap - sink - window - heavy + 1) // (int(min_sets) + 1)))
    return sink, window, heavy, t


def capped_stream(
    K, V, cap, ctx, *, sink, t, window_frac, heavy_frac=0.0, window_min=0, t_div=16, min_sets=1, walk=None
) -> JointBalanceStream:
    """An empty :class:`JointBalanceStream` for ``K``'s heads holding at most ``cap`` tokens per head."""
    H, _, d = K.shape
    s0, w, hv, t = cap_layout(cap, sink, t, window_frac, heavy_frac, window_min, t_div, min_sets)
    return JointBalanceStream(
        H, d, V.shape[-1], t=t, rounds=0, sink=s0, scale=ctx.scale, rng=ctx.rng, like=K, backend=ctx.backend,
        walk=walk, window=w, cap=cap, heavy=hv,
    )  # fmt: skip


def _torch_norms(V):
    from balancekv.fast.merge_reduce import scaled_norms  # noqa: PLC0415  (torch path only)

    return scaled_norms(V).tolist()


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
        guard: float = GUARD,
        like=None,
        backend: str = "auto",
    ):
        self.H, self.d, self.s, self.t = H, d, s, int(t)
        self.kw = dict(scale=scale, rng=rng, c=c, delta=delta, max_retries=max_retries)
        self.eps = eps
        self.guard = float(guard)
        self.torch = is_torch(like)
        if self.torch:  # the torch instance (same uniforms, same state), on like's device and dtype
            from balancekv.fast.merge_reduce import MergeAndReduceTorch  # noqa: PLC0415  (torch path only)

            self.kw.update(dtype=like.dtype, device=like.device, backend=backend)
            self._inst = MergeAndReduceTorch
        else:
            self._inst = MergeAndReduce
        self.num = [dict() for _ in range(H)]  # bucket -> MergeAndReduce
        self.den = [self._inst(self.t, d, 1, **self.kw) for _ in range(H)]
        self.total_sq = np.zeros(H)
        self.erased_sq = np.zeros(H)
        self.erased = [[] for _ in range(H)]  # positions erased from the numerator

    def _add(self, h: int, k, v, pos: int, nv: float) -> None:
        self.den[h].add(k, self._one, pos)
        nv2 = nv * nv
        self.total_sq[h] += nv2
        if nv2 == 0.0:
            return
        if self.eps is not None and self.erased_sq[h] + nv2 <= (self.eps / 2) ** 2 * self.total_sq[h]:
            self.erased_sq[h] += nv2
            self.erased[h].append(int(pos))
            return
        b = int(value_norm_bucket(nv))
        inst = self.num[h].get(b)
        if inst is None:
            inst = self.num[h][b] = self._inst(self.t, self.d, self.s, **self.kw)
        inst.add(k, v, pos)

    def extend(self, K: np.ndarray, V: np.ndarray, positions) -> None:
        """Feed tokens ``K (H, m, d)``, ``V (H, m, s)`` in stream order (token by token)."""
        if self.torch:
            from balancekv.fast.merge_reduce import scaled_norms  # noqa: PLC0415  (torch path only)

            self._one = torch.ones(1, dtype=K.dtype, device=K.device)
            norms = scaled_norms(V).tolist()  # host floats: the bucket decisions are taken there
            positions = positions.tolist() if is_torch(positions) else list(np.asarray(positions).reshape(-1))
        else:
            self._one = np.ones(1)
            norms = _np_scaled_norms(V)
            positions = np.asarray(positions, np.int64)
        for j in range(K.shape[1]):
            for h in range(self.H):
                self._add(h, K[h, j], V[h, j], int(positions[j]), float(norms[h][j]))

    def append(self, k, v, pos):
        if not self.torch:
            k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        self.extend(k, v, pos)
        return self.segments()

    # ------------------------------------------------------------------ views
    def head_slots(self, h: int):
        """``(K, V, num_logw, den_logw, positions)`` of head ``h``.

        Numerator slots whose token is not in the denominator set also enter the denominator, with
        the guard weight ``guard / #numerator slots`` (:data:`GUARD`): this biases the denominator up
        by a relative ``<= guard`` and bounds ``|z(q)| <= max_j w_j ||v_j|| / w'_j`` for every query
        (``w'_j`` the token's denominator weight), whatever the key norms, so the two-set estimate
        cannot overflow (an unreliable one is flagged instead, see ``Built.info``). While nothing
        has been reduced every token is in the denominator set and the estimate stays exact.
        """
        xp = _xp(self.torch)
        Ks, Vs, nl, dl, ps = [], [], [], [], []
        for b in sorted(self.num[h]):
            K, V, p, lw = self.num[h][b].contents()
            Ks.append(K), Vs.append(V), nl.append(lw), ps.append(p)
        Kd, _, pd, lwd = self.den[h].contents()
        n_num = sum(int(x.shape[0]) for x in nl)
        gw = np.log(self.guard / max(n_num, 1)) if self.guard > 0 else -np.inf
        for p, lw in zip(ps, nl):
            covered = torch.isin(p, pd) if self.torch else np.isin(p, pd)
            if self.torch:
                dl.append(torch.full_like(lw, -np.inf).masked_fill_(~covered, gw))
            else:
                dl.append(np.where(covered, -np.inf, gw))
        # denominator slots need only keys; the value stored there is never read (weight -inf)
        Ks.append(Kd)
        Vs.append(
            torch.zeros((Kd.shape[0], self.s), dtype=Kd.dtype, device=Kd.device)
            if self.torch
            else np.zeros((Kd.shape[0], self.s))
        )
        nl.append(xp.full_like(lwd, -np.inf))
        dl.append(lwd), ps.append(pd)
        return tuple(torch.cat(x, 0) if self.torch else np.concatenate(x, axis=0) for x in (Ks, Vs, nl, dl, ps))

    def segments(self):
        heads = [self.head_slots(h) for h in range(self.H)]
        m = max(1, max(x[0].shape[0] for x in heads))
        if self.torch:
            ref = heads[0][0]
            z = lambda *sh: torch.zeros(sh, dtype=ref.dtype, device=ref.device)
            K, V = z(self.H, m, self.d), z(self.H, m, self.s)
            nl, dl = z(self.H, m).fill_(-np.inf), z(self.H, m).fill_(-np.inf)
            pos = torch.full((self.H, m), -1, dtype=torch.int64, device=ref.device)
        else:
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
    defaults = {
        "variant": "joint",
        "t": 64,
        "sink": 4,
        "gamma": 4.0,
        "a2": 0.025,
        "c": None,
        "max_retries": 3,
        "cap_window": 0.25,
        "cap_heavy": 0.0,
        "heavy_frac": 0.3,
    }
    has_theorem = True

    def uses_queries(self, opts, queries_given):
        return bool(queries_given and opts["variant"] == "joint" and opts["heavy_frac"] > 0)

    def rng_level(self, level):
        """The level without its heavy-hitter layout: without queries a build draws what ``heavy_frac=0``'s does."""
        return {k: v for k, v in level.items() if not k.startswith("heavy")}

    def meets_keep_budget(self, opts):
        return opts.get("variant") != "theory"  # MergeAndReduce's size is predicted, not chosen

    def check_options(self, opts):
        if opts["variant"] not in VARIANTS:
            raise ValueError(f"option variant must be one of {VARIANTS}, got {opts['variant']!r}")
        check_int_option(opts, "t", 1)
        check_int_option(opts, "sink", 0)
        check_float_option(opts, "gamma", 0.0)
        check_float_option(opts, "a2", 0.0)
        if opts["c"] is not None:
            check_float_option(opts, "c", 0.0, lo_open=True)
        check_int_option(opts, "max_retries", 0)
        check_cap_options(opts)
        check_float_option(opts, "heavy_frac", 0.0, 1.0)
        if opts["heavy_frac"] >= 1.0:
            raise ValueError(f"option heavy_frac must lie in [0, 1), got {opts['heavy_frac']}")

    # ------------------------------------------------------------------ levels
    @staticmethod
    def _joint_t(n, opts):
        """The batch size: the option ``t``, halved while a merged set would exceed a quarter of ``n``."""
        t = int(opts["t"])
        while t > 1 and 8 * t > n:
            t //= 2
        return t

    def levels(self, n, opts):
        if opts["variant"] == "theory":
            out, t = [], 1 << max(1, int(np.floor(np.log2(max(n, 2)))) - 2)
            while t >= 2:
                out.append({"t": int(t)})
                t //= 2
            return out
        t, out, L = self._joint_t(n, opts), [], 1
        while L <= 30 and joint_slots(n, t, L, opts["sink"]) < n:
            lv = {"rounds": L, "t": t}
            if out and joint_slots(n, t, L, opts["sink"]) == joint_slots(n, t, L - 1, opts["sink"]):
                break
            out.append(self._with_heavy(lv, joint_slots(n, t, L, opts["sink"]), n, opts))
            L += 1
        return out

    def level_for_keep(self, keep, n, opts):
        if keep >= 1.0:
            return {"exact": True}  # every token, exactly (issue 15 item 9)
        if opts["variant"] == "theory":
            return {"keep": float(keep)}
        lv = self._joint_layout(keep * n, n, opts)
        return {"exact": True} if lv is None else self._with_heavy(lv, keep * n, n, opts)

    def _with_heavy(self, level: dict, budget: float, n: int, opts) -> dict:
        """``level`` plus, for builds with observed queries, the layout that keeps ``heavy_frac`` of ``budget``
        as exact heavy hitters (``heavy``) and gives the sets and window the rest (``heavy_rounds`` …)."""
        h = int(round(opts["heavy_frac"] * budget))
        if h < 1:
            return level
        lv = self._joint_layout(budget - h, n - h, opts)
        if lv is None:
            return level
        return {**level, "heavy": h, **{"heavy_" + k: v for k, v in lv.items()}}

    def _joint_layout(self, budget: float, n: int, opts) -> dict | None:
        """The largest-``t``, fewest-rounds joint layout of ``n`` tokens within ``budget`` slots, the rest of the
        budget as the exact window; ``None`` when no layout is smaller than the exact cache."""
        t = self._joint_t(n, opts)
        sink = opts["sink"]
        while True:
            for L in range(1, 31):
                if joint_slots(n, t, L, sink) <= budget:
                    # the budget left over goes to the exact recent window (largest that fits)
                    lo, hi = 0, n
                    while lo < hi:
                        mid = (lo + hi + 1) // 2
                        if joint_slots(n, t, L, sink, mid) <= budget:
                            lo = mid
                        else:
                            hi = mid - 1
                    return {"rounds": L, "t": t, "window": int(lo)}
            if t == 1:
                return None  # no configuration is smaller: never larger than exact
            t //= 2

    def _t_for_keep(self, keep, V):
        n = V.shape[1]
        vn = _np_scaled_norms(V) if not is_torch(V) else np.asarray(_torch_norms(V))
        b = value_norm_bucket(vn)
        inst = max(len(np.unique(b[h][vn[h] > 0])) for h in range(V.shape[0])) + 1
        best = 1
        for t in range(1, n + 1):
            if predicted_slots(n, t, inst) <= keep * n:
                best = t
        return best

    # ------------------------------------------------------------------ build
    def build_reference(self, K, V, level, ctx):
        return self._build(K, V, level, ctx)

    def build_torch(self, K, V, level, ctx):
        return self._build(K, V, level, ctx)

    def _build(self, K, V, level, ctx):
        n = K.shape[1]
        b = self._build_level(K, V, level, ctx)
        pos = torch.arange(n, device=K.device) if is_torch(K) else np.arange(n)
        cl = (lambda x: x.clone()) if is_torch(K) else (lambda x: x.copy())
        exact = Built([exact_segment(cl(K), cl(V), pos)], info={**b.info, "exact": True, "kept": n})
        # never larger than the exact cache (issue 15 item 8), by the bytes of the slots attended over
        # (the joint stream's state *is* its segments; the theory stream keeps its instances besides)
        held = held_nbytes(b.segments) if b.info.get("variant") == "theory" else held_nbytes(b.segments, b.stream)
        if b.info.get("exact") or held >= held_nbytes(exact.segments):
            return exact
        return b

    def _build_level(self, K, V, level, ctx):
        H, n, d = K.shape
        s = V.shape[-1]
        pos = torch.arange(n, device=K.device) if is_torch(K) else np.arange(n)
        if level.get("exact"):
            return Built([], info={"exact": True, "kept": n})
        if "rounds" in level:
            o = ctx.opts
            heavy = int(level.get("heavy", 0)) if ctx.queries_given else 0
            if heavy:  # the layout with exact heavy hitters: they win their slots as blocks leave the window
                level = {**level, **{k[len("heavy_") :]: v for k, v in level.items() if k.startswith("heavy_")}}
            stream = JointBalanceStream(
                H, d, s, t=level["t"], rounds=level["rounds"], sink=o["sink"], scale=ctx.scale, rng=ctx.rng,
                like=K, backend=ctx.backend, walk={"gamma": o["gamma"], "a2": o["a2"]}, window=level.get("window", 0),
                heavy=heavy,
            )  # fmt: skip
            if heavy:  # sinks, then the first middle tokens straight into the heavy slots, then the rest streams
                sc, a, b = self.heavy_scores(K, ctx), min(o["sink"], n), min(o["sink"], n) + heavy
                stream.extend(K[:, :a], V[:, :a], pos[:a])
                hp = pos[a:b][None].expand(H, -1) if is_torch(K) else np.broadcast_to(pos[a:b], (H, heavy))
                stream.seed_heavy(K[:, a:b], V[:, a:b], hp, scores=sc[:, a:b])
                stream.extend(K[:, b:], V[:, b:], pos[b:], scores=sc[:, b:])
            else:
                stream.extend(K, V, pos)
            info = {"variant": "joint", **level, "kept": int(stream.memory()[0])}
            return Built(stream.segments(), stream=stream, info=info)
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
            like=K,
            backend=ctx.backend,
        )
        stream.extend(K, V, pos)
        segs = stream.segments()
        info = {
            "variant": "theory",
            "t": t,
            "kept": int(stream.memory().max()),
            "retries": stream.retries,
            "fallbacks": stream.fallbacks,
        }
        flag_probe_error(info, probe_error(segs, K, V, ctx.probes, ctx.scale), self.name)
        return Built(segs, stream=stream, info=info)

    supports_cap = True

    def build_capped(self, K, V, cap, ctx):
        """The joint stream under a cap (``variant="joint"`` only): :func:`cap_layout` sizes it, the prompt
        streams through it, and adjacent sets are merged (halved by the walk) whenever the next set would
        not fit (:meth:`JointBalanceStream._enforce_cap`)."""
        o = ctx.opts
        if o["variant"] != "joint":
            raise ValueError("cap: only variant='joint' of balance-stream has a capped decode policy")
        H, n, d = K.shape
        stream = capped_stream(
            K, V, cap, ctx, sink=o["sink"], t=o["t"], window_frac=o["cap_window"], heavy_frac=o["cap_heavy"],
            walk={"gamma": o["gamma"], "a2": o["a2"]},
        )  # fmt: skip
        stream.extend(K, V, torch.arange(n, device=K.device) if is_torch(K) else np.arange(n))
        info = {"variant": "joint", "cap": int(cap), "sink": stream.sink, "window": stream.window, "t": stream.t}
        info["heavy"] = stream.heavy
        return Built(stream.segments(), stream=stream, info=info)

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
