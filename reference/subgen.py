"""SubGen [SUB] (Zandieh, Han, Mirrokni, Karbasi, arXiv 2402.06082): streaming attention in sublinear memory.

Two independent sketches of the prompt-so-far, SPEC section 5:

* **Numerator** ``N(q) = sum_i e^{a_i} v_i`` by l2 sampling of values: ``s_num``
  independent slots, running ``mu = sum_i ||v_i||^2``; when token ``i`` arrives,
  ``mu`` grows by ``||v_i||^2`` first, then every slot independently takes token
  ``i`` with probability ``||v_i||^2 / mu``. Afterwards each slot holds token
  ``i`` with probability ``||v_i||^2 / mu`` (zero-norm values never), and::

      N^(q) = (mu / s_num) * sum_slots e^{a_j} v_j / ||v_j||^2

  is unbiased (approximate matrix product, [SUB] Lemma on l2 sampling).
* **Denominator** ``Z(q) = sum_i e^{a_i}`` by online clustering of keys: each
  key, *after scale folding* ``k~ = scale * k`` (so that ``a = <q, k~>`` and a
  cluster of radius ``rho`` around its centre spreads the logits of a query of
  norm ``r`` by at most ``2 r rho``), goes to its nearest centre; if there is no
  centre, or the nearest one is farther than ``threshold`` (strictly), the key
  becomes the centre of a new cluster. Each cluster keeps its count ``n_c`` and
  ``t`` independent reservoir slots (slot replaced with probability ``1/n_c``
  after the count is incremented, so each slot is a uniform member), and::

      Z^(q) = sum_c (n_c / t) * sum_slots e^{a}

  While ``n_c <= t`` the cluster's members themselves are kept and enter with
  weight 1 (exact); the slots run alongside so that the sketch is ready once
  the cluster outgrows ``t``.

The offline variant (what [SUB]'s experiments ran) replaces the online
clustering by greedy farthest-point k-centre (Gonzalez) with ``m`` centres on
the folded keys, then draws the same per-cluster and l2 samples i.i.d.; its
state has the same distribution as the streaming state at that count, so
decoding continues with the streaming rule (new clusters open beyond the
k-centre radius).

Randomness only through uniforms in ``[0, 1)``, in a documented layout, so a
fast version fed the same uniforms makes the same choices:

* streaming: ``U (T, H, t_max + s_num)``, token-major (drawing it in one call
  equals drawing ``(H, t_max + s_num)`` once per token, so chunked and
  token-by-token appends agree). Head ``h`` uses ``U[j, h, :t_h]`` for its
  reservoir slots (``t_h <= t_max``; only the cluster of token ``j`` draws) and
  ``U[j, h, t_max:]`` for its numerator slots. A slot is replaced iff ``u < p``.
* offline: ``U_res (H, m, t_max)`` (cluster ``c``, in centre order, slot ``j``
  takes member ``floor(u * n_c)``) and ``U_num (H, s_num)`` (inverse CDF of
  ``||v||^2 / mu`` over tokens in order).

Output: :meth:`SubGenState.entries` lists, per head, the distinct stored tokens
with two log-weights; a token drawn by several slots is stored once with the
summed weight (the estimate is unchanged, the memory smaller). The error bound
([SUB] Thm 2.4 with our constants) is :func:`balancekv.bounds.subgen_sample_sizes`,
derived in ``proofs/subgen.md``. Every reconstruction choice (threshold rule,
order of update and query, scale folding) is listed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: numerator estimators: ``"l2"`` (the paper's l2 value sampling, a two-set estimate) and ``"cluster"``
#: (the numerator from the denominator's own cluster samples: one set, a ratio estimator)
ESTIMATORS = ("l2", "cluster")

__all__ = [
    "ESTIMATORS",
    "SubGenHead",
    "SubGenState",
    "fold_scale",
    "greedy_k_center",
    "online_clusters",
    "subgen_offline",
    "subgen_stream",
]


def fold_scale(K: np.ndarray, scale: float) -> np.ndarray:
    """Keys with the logit scale folded in, ``k~ = scale * k``: then ``a = <q, k~>``."""
    return float(scale) * np.asarray(K, dtype=np.float64)


def greedy_k_center(X: np.ndarray, m: int):
    """Greedy farthest-point k-centre (Gonzalez 1985) on the rows of ``X (n, d)``.

    The first centre is row 0; each next centre is the row farthest from the
    centres so far (lowest index on ties); stops at ``m`` centres or when every
    row coincides with a centre. Returns ``(centres, assign, dist)``: centre row
    indices ``(k,)`` with ``k <= m``, the nearest centre of each row ``(n,)``
    (lowest centre on ties) and the distance to it ``(n,)``. The radius
    ``dist.max()`` is at most twice the optimal k-centre radius.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    centres = [0]
    dist = np.linalg.norm(X - X[0], axis=-1)
    assign = np.zeros(n, dtype=np.int64)
    while len(centres) < min(m, n):
        far = int(np.argmax(dist))
        if dist[far] <= 0.0:
            break
        centres.append(far)
        d_new = np.linalg.norm(X - X[far], axis=-1)
        closer = d_new < dist
        assign[closer] = len(centres) - 1
        dist = np.where(closer, d_new, dist)
    return np.asarray(centres, dtype=np.int64), assign, dist


def online_clusters(X: np.ndarray, threshold: float):
    """The streaming clustering of ``X (n, d)`` alone (deterministic, no sampling).

    Row ``i`` joins its nearest centre (lowest index on ties) unless there is
    none or that centre is farther than ``threshold``; then it is a new centre.
    Returns ``(centres, assign, dist)`` like :func:`greedy_k_center`. If the rows
    are ``(m, threshold)``-clusterable (a partition into ``m`` sets of diameter
    ``<= threshold``) there are at most ``m`` centres: centres are pairwise more
    than ``threshold`` apart, so no two lie in one set.
    """
    X = np.asarray(X, dtype=np.float64)
    centres: list[int] = []
    assign = np.zeros(X.shape[0], dtype=np.int64)
    dist = np.zeros(X.shape[0])
    C = np.empty((0, X.shape[1]))
    for i, x in enumerate(X):
        if C.shape[0]:
            dc = np.linalg.norm(C - x, axis=-1)
            c = int(np.argmin(dc))
            if dc[c] <= threshold:
                assign[i], dist[i] = c, dc[c]
                continue
        centres.append(i)
        assign[i] = len(centres) - 1
        C = np.vstack([C, x[None]])
    return np.asarray(centres, dtype=np.int64), assign, dist


@dataclass
class _Cluster:
    centre: np.ndarray  # folded key of the centre, (d,)
    count: int  # n_c
    radius: float  # max folded distance member -> centre
    slot_pos: np.ndarray  # (t,) token index held by each reservoir slot
    slot_k: np.ndarray  # (t, d)
    slot_v: np.ndarray  # (t, s)
    members: list | None  # [(pos, k, v)] while count <= t, then None


class SubGenHead:
    """SubGen's streaming state for one head ([SUB] Alg. 1 and the l2 sampler; SPEC section 5).

    ``t`` reservoir slots per cluster, ``s_num`` numerator slots, clustering
    ``threshold`` on folded keys ``scale * k``. Memory: ``O(m (t + 1) (d + s) + s_num (d + s))``
    for ``m`` clusters, independent of the number of tokens seen.
    """

    def __init__(
        self, d: int, s: int, t: int, s_num: int, threshold: float, scale: float, estimator: str = "l2", unit=1.0
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if t < 1 or s_num < (1 if estimator == "l2" else 0):
            raise ValueError(f"t and s_num must be >= 1, got t={t}, s_num={s_num}")
        self.estimator = estimator
        # squared value norms are taken of v / unit (a power of two, exact): mu and ||v||^2 cannot overflow
        self.inv_unit = 1.0 / float(unit)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.d, self.s, self.t, self.s_num = int(d), int(s), int(t), int(s_num)
        self.threshold, self.scale = float(threshold), float(scale)
        self.clusters: list[_Cluster] = []
        self._C = np.empty((0, d))  # centres stacked, for the nearest-centre search
        self.mu = 0.0
        self.n_seen = 0
        self.num_pos = np.full(s_num, -1, dtype=np.int64)
        self.num_k = np.zeros((s_num, d))
        self.num_v = np.zeros((s_num, s))
        self.num_sq = np.zeros(s_num)  # ||v_j||^2 of the token in slot j
        #: storage dtypes of the held keys and values (float64 unless :meth:`hold_tokens_as`); sums are float64
        self.kdt, self.vdt = np.dtype(np.float64), np.dtype(np.float64)

    def hold_tokens_as(self, key_dtype, value_dtype) -> None:
        """Hold the sampled keys and values (slots, members, numerator slots) in storage dtypes (an fp16 cache's);
        every computation still runs in float64 on them."""
        self.kdt, self.vdt = np.dtype(key_dtype), np.dtype(value_dtype)
        self.num_k, self.num_v = self.num_k.astype(self.kdt), self.num_v.astype(self.vdt)
        for cl in self.clusters:
            cl.slot_k, cl.slot_v = cl.slot_k.astype(self.kdt), cl.slot_v.astype(self.vdt)
            if cl.members is not None:
                cl.members = [(p, k.astype(self.kdt), v.astype(self.vdt)) for p, k, v in cl.members]

    def remap_positions(self, where: np.ndarray) -> None:
        """Token ``i`` of the tokens streamed so far becomes position ``where[i]`` (a sketch built on a subset of a
        cache, e.g. its middle without the heavy hitters, keeps the cache's positions)."""
        where = np.asarray(where, np.int64)
        f = lambda p: np.where(p >= 0, where[np.maximum(p, 0)], -1)
        self.num_pos = f(self.num_pos)
        for cl in self.clusters:
            cl.slot_pos = f(cl.slot_pos)
            if cl.members is not None:
                cl.members = [(int(where[p]), k, v) for p, k, v in cl.members]

    # ------------------------------------------------------------------ update
    def assign(self, k: np.ndarray) -> tuple[int, float]:
        """The cluster that key ``k`` joins, ``(-1, 0)`` for a new one, and its folded distance."""
        if not self.clusters:
            return -1, 0.0
        dc = np.linalg.norm(self._C - self.scale * k, axis=-1)
        c = int(np.argmin(dc))
        return (c, float(dc[c])) if dc[c] <= self.threshold else (-1, 0.0)

    def update(self, k: np.ndarray, v: np.ndarray, pos: int, u_res: np.ndarray, u_num: np.ndarray) -> None:
        """Add token ``pos`` (key ``k (d,)``, value ``v (s,)``) with uniforms ``u_res (t,)``, ``u_num (s_num,)``."""
        c, dist = self.assign(k)
        if c < 0:
            t = self.t
            self.clusters.append(
                _Cluster(
                    self.scale * k,
                    0,
                    0.0,
                    np.full(t, -1, np.int64),
                    np.zeros((t, self.d), self.kdt),
                    np.zeros((t, self.s), self.vdt),
                    [],
                )
            )
            self._C = np.vstack([self._C, (self.scale * k)[None]])
            c = len(self.clusters) - 1
        cl = self.clusters[c]
        cl.count += 1
        cl.radius = max(cl.radius, dist)
        if cl.members is not None:
            if cl.count <= self.t:
                cl.members.append((int(pos), k.astype(self.kdt), v.astype(self.vdt)))
            else:
                cl.members = None  # outgrew t: from now on the reservoir slots stand for the cluster
        take = u_res[: self.t] < 1.0 / cl.count  # reservoir: each slot uniform over the members
        cl.slot_pos[take], cl.slot_k[take], cl.slot_v[take] = pos, k, v
        vu = v * self.inv_unit
        sq = float(vu @ vu)
        self.mu += sq
        if sq > 0.0 and self.s_num:  # l2 sampling: zero-norm values are never drawn
            take = u_num < sq / self.mu
            self.num_pos[take], self.num_k[take], self.num_v[take], self.num_sq[take] = pos, k, v, sq
        self.n_seen += 1

    # ------------------------------------------------------------------ read
    @property
    def m(self) -> int:
        return len(self.clusters)

    @property
    def cluster_radius(self) -> float:
        """Largest folded distance of a member to its centre (``rho`` of ``proofs/subgen.md``)."""
        return max((c.radius for c in self.clusters), default=0.0)

    def entries(self):
        """Distinct stored tokens: ``(pos (k,), K (k, d), V (k, s), num_logw (k,), den_logw (k,))``, by position.

        Numerator slot weight ``mu / (s_num ||v_j||^2)``; denominator weight 1 for
        members of clusters with ``n_c <= t``, else ``n_c / t`` per reservoir slot;
        a token held by several slots carries the sum (``log(count) + log w``).
        """
        table: dict[int, list] = {}

        def add(p, k, v, which, logw):
            row = table.setdefault(int(p), [k, v, [], []])
            row[2 + which].append(logw)

        shared = self.estimator == "cluster"
        if self.mu > 0.0 and not shared:
            for p, k, v, sq in zip(self.num_pos, self.num_k, self.num_v, self.num_sq):
                if p >= 0:
                    add(p, k, v, 0, np.log(self.mu) - np.log(self.s_num) - np.log(sq))
        for cl in self.clusters:
            if cl.members is not None:
                for p, k, v in cl.members:
                    add(p, k, v, 1, 0.0)
                    if shared:
                        add(p, k, v, 0, 0.0)
            else:
                for p, k, v in zip(cl.slot_pos, cl.slot_k, cl.slot_v):
                    add(p, k, v, 1, np.log(cl.count) - np.log(self.t))
                    if shared:
                        add(p, k, v, 0, np.log(cl.count) - np.log(self.t))
        order = sorted(table)
        n = len(order)
        pos = np.asarray(order, dtype=np.int64)
        K = np.zeros((n, self.d))
        Vv = np.zeros((n, self.s))
        nl = np.full(n, -np.inf)
        dl = np.full(n, -np.inf)
        for i, p in enumerate(order):
            k, v, lw_num, lw_den = table[p]
            K[i], Vv[i] = k, v
            if lw_num:
                nl[i] = np.logaddexp.reduce(np.asarray(lw_num))
            if lw_den:
                dl[i] = np.logaddexp.reduce(np.asarray(lw_den))
        return pos, K, Vv, nl, dl

    def estimate(self, q: np.ndarray, shift: float = 0.0) -> tuple[np.ndarray, float]:
        """``(N^(q) e^{-shift}, Z^(q) e^{-shift})`` straight from the slots (the formulas of SPEC 5)."""
        N = np.zeros(self.s)
        if self.estimator == "cluster":
            pos, K, Vv, nl, dl = self.entries()
            a = self.scale * (K @ q) - shift
            return np.exp(a + nl) @ Vv, float(np.sum(np.exp(a + dl)))
        if self.mu > 0.0:
            for p, k, v, sq in zip(self.num_pos, self.num_k, self.num_v, self.num_sq):
                if p >= 0:
                    N += np.exp(self.scale * (q @ k) - shift) * v / sq
            N *= self.mu / self.s_num
        Z = 0.0
        for cl in self.clusters:
            if cl.members is not None:
                Z += sum(np.exp(self.scale * (q @ k) - shift) for _, k, _ in cl.members)
            else:
                Z += cl.count / self.t * float(np.sum(np.exp(self.scale * (cl.slot_k @ q) - shift)))
        return N, Z

    def stored_floats(self) -> int:
        """Floats held by the state (centres, slots, members, counts): the memory the stream needs."""
        per_tok = self.d + self.s
        total = self.s_num * (per_tok + 1) + 1
        for cl in self.clusters:
            total += self.d + 2 + self.t * per_tok + (len(cl.members) * per_tok if cl.members else 0)
        return total


def _per_head(x, H: int, name: str) -> list[int]:
    arr = np.broadcast_to(np.asarray(x), (H,))
    if np.any(arr < 1):
        raise ValueError(f"{name} must be >= 1 for every head, got {arr.tolist()}")
    return [int(a) for a in arr]


class SubGenState:
    """SubGen over ``H`` independent heads; ``append`` adds tokens, ``entries``/``segments`` read the sketch.

    ``t`` may differ per head (an int or ``H`` ints); ``s_num`` is shared.
    """

    def __init__(self, heads: list[SubGenHead]):
        self.heads = heads
        self.t_max = max(h.t for h in heads)
        self.s_num = heads[0].s_num

    @property
    def H(self) -> int:
        return len(self.heads)

    def hold_tokens_as(self, key_dtype, value_dtype) -> None:
        for head in self.heads:
            head.hold_tokens_as(key_dtype, value_dtype)

    def remap_positions(self, where) -> None:
        """Per head, stored position ``i`` becomes ``where[h, i]`` (:meth:`SubGenHead.remap_positions`)."""
        for head, w in zip(self.heads, np.asarray(where)):
            head.remap_positions(w)

    def draw_uniforms(self, rng: np.random.Generator, T: int) -> np.ndarray:
        """``(T, H, t_max + s_num)`` uniforms in the streaming layout (see module docstring)."""
        return rng.random((T, self.H, self.t_max + self.s_num))

    def append(
        self,
        K: np.ndarray,
        V: np.ndarray,
        positions,
        rng: np.random.Generator | None = None,
        uniforms: np.ndarray | None = None,
    ) -> "SubGenState":
        """Stream tokens ``K (H, T, d)``, ``V (H, T, s)`` at ``positions (T,)`` through every head, in order."""
        K, V = np.asarray(K, np.float64), np.asarray(V, np.float64)
        T = K.shape[-2]
        positions = np.asarray(positions, dtype=np.int64).reshape(T)
        if uniforms is None:
            if rng is None:
                raise ValueError("give rng or uniforms")
            uniforms = self.draw_uniforms(rng, T)
        U = np.asarray(uniforms, np.float64)
        if U.shape != (T, self.H, self.t_max + self.s_num):
            raise ValueError(f"uniforms must have shape {(T, self.H, self.t_max + self.s_num)}, got {U.shape}")
        for h, head in enumerate(self.heads):
            for j in range(T):
                head.update(K[h, j], V[h, j], int(positions[j]), U[j, h, : head.t], U[j, h, self.t_max :])
        return self

    def entries(self):
        return [h.entries() for h in self.heads]

    def estimate(self, Q: np.ndarray, shift: float = 0.0):
        """``N^ (H, mq, s)`` and ``Z^ (H, mq)`` for queries ``Q (H, mq, d)``, both times ``e^{-shift}``."""
        N = np.zeros((self.H, Q.shape[-2], self.heads[0].s))
        Z = np.zeros((self.H, Q.shape[-2]))
        for h, head in enumerate(self.heads):
            for j, q in enumerate(Q[h]):
                N[h, j], Z[h, j] = head.estimate(q, shift)
        return N, Z

    def padded(self):
        """Per-head entries padded to one width: ``pos (H, w)`` (-1 pad), ``K``, ``V``, log-weights (``-inf`` pad)."""
        ents = self.entries()
        w = max(1, max(e[0].shape[0] for e in ents))
        d, s = self.heads[0].d, self.heads[0].s
        pos = np.full((self.H, w), -1, dtype=np.int64)
        K = np.zeros((self.H, w, d))
        Vv = np.zeros((self.H, w, s))
        nl = np.full((self.H, w), -np.inf)
        dl = np.full((self.H, w), -np.inf)
        for h, (p, k, v, a, b) in enumerate(ents):
            r = p.shape[0]
            pos[h, :r], K[h, :r], Vv[h, :r], nl[h, :r], dl[h, :r] = p, k, v, a, b
        return pos, K, Vv, nl, dl

    def stored_floats(self) -> np.ndarray:
        return np.asarray([h.stored_floats() for h in self.heads])


def subgen_stream(
    K,
    V,
    *,
    t,
    s_num: int,
    threshold,
    scale: float,
    rng: np.random.Generator | None = None,
    uniforms: np.ndarray | None = None,
    estimator: str = "l2",
    unit=1.0,
) -> SubGenState:
    """Streaming SubGen over keys ``K (H, n, d)`` and values ``V (H, n, s)``, tokens in order 0..n-1.

    ``threshold``: clustering radius on folded keys ``scale * k`` (a float or one per head);
    ``t``: reservoir slots per cluster (int or one per head); ``s_num``: numerator slots.
    Randomness from ``uniforms`` ``(n, H, max(t) + s_num)`` or, if not given, drawn from
    ``rng`` in that layout.
    """
    K, V = np.asarray(K, np.float64), np.asarray(V, np.float64)
    H, n, d = K.shape
    ts = _per_head(t, H, "t")
    thr = np.broadcast_to(np.asarray(threshold, np.float64), (H,))
    units = np.broadcast_to(np.asarray(unit, np.float64), (H,))
    heads = [SubGenHead(d, V.shape[-1], ts[h], s_num, float(thr[h]), scale, estimator, units[h]) for h in range(H)]
    return SubGenState(heads).append(K, V, np.arange(n), rng=rng, uniforms=uniforms)


def subgen_offline(
    K,
    V,
    *,
    t,
    s_num: int,
    m: int,
    scale: float,
    rng: np.random.Generator | None = None,
    uniforms: tuple[np.ndarray, np.ndarray] | None = None,
    estimator: str = "l2",
    unit=1.0,
) -> SubGenState:
    """Offline SubGen: greedy k-centre with ``m`` centres on folded keys, then i.i.d. samples.

    Cluster ``c`` gets ``t`` uniform members (slot ``j``: member ``floor(U_res[h, c, j] * n_c)``,
    members in token order) and the numerator ``s_num`` tokens drawn with probability
    ``||v||^2 / mu`` (inverse CDF of ``U_num[h, j]``). ``uniforms = (U_res (H, m, max t), U_num (H, s_num))``
    or drawn from ``rng`` in that order. The returned state continues as a stream with
    ``threshold`` = that head's k-centre radius.
    """
    K, V = np.asarray(K, np.float64), np.asarray(V, np.float64)
    H, n, d = K.shape
    s = V.shape[-1]
    ts = _per_head(t, H, "t")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    t_max = max(ts)
    if uniforms is None:
        if rng is None:
            raise ValueError("give rng or uniforms")
        uniforms = (rng.random((H, m, t_max)), rng.random((H, s_num)))
    U_res, U_num = (np.asarray(u, np.float64) for u in uniforms)
    if U_res.shape != (H, m, t_max) or U_num.shape != (H, s_num):
        raise ValueError(
            f"uniforms must have shapes {(H, m, t_max)} and {(H, s_num)}, got {U_res.shape} and {U_num.shape}"
        )
    heads = []
    units = np.broadcast_to(np.asarray(unit, np.float64), (H,))
    for h in range(H):
        Xf = fold_scale(K[h], scale)
        centres, assign, dist = greedy_k_center(Xf, m)
        head = SubGenHead(d, s, ts[h], s_num, float(dist.max()), scale, estimator, units[h])
        for c, ci in enumerate(centres):
            mem = np.flatnonzero(assign == c)  # token order
            nc = mem.size
            pick = mem[np.minimum((U_res[h, c, : ts[h]] * nc).astype(np.int64), nc - 1)]
            head.clusters.append(
                _Cluster(
                    Xf[ci].copy(),
                    int(nc),
                    float(dist[mem].max()),
                    pick.astype(np.int64),
                    K[h, pick].copy(),
                    V[h, pick].copy(),
                    [(int(i), K[h, i].copy(), V[h, i].copy()) for i in mem] if nc <= ts[h] else None,
                )
            )
        head._C = Xf[centres].copy()
        Vu = V[h] * head.inv_unit
        sq = np.einsum("ij,ij->i", Vu, Vu)
        cum = np.cumsum(sq)
        head.mu = float(cum[-1])
        if head.mu > 0.0 and s_num:
            idx = np.searchsorted(cum, U_num[h] * head.mu, side="right")
            last = int(np.flatnonzero(sq > 0)[-1])
            idx = np.minimum(idx, last)  # u * mu may round up to mu
            head.num_pos[:] = idx
            head.num_k[:], head.num_v[:], head.num_sq[:] = K[h, idx], V[h, idx], sq[idx]
        head.n_seen = n
        heads.append(head)
    return SubGenState(heads)
