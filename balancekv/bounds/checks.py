"""Theorem checks that can fail: each bound tested where it says something, beside controls that break it.

Every check builds one seeded instance in a regime where the bound is *informative* (smaller than
what a wrong algorithm gets), evaluates the algorithm and one or more controls against the same
bound, and returns a :class:`CheckResult`. The tests (``tests/test_walk.py``,
``tests/test_softmax_balance.py``, ``tests/test_merge_reduce.py``, ``tests/test_subgen.py``) assert
that the algorithm is within the bound and every control outside it; ``tests/test_mutations.py``
replaces the walk by fair coins and each estimator by zero and asserts that the algorithm side then
fails; ``balancekv reproduce bounds`` prints both sides.

Controls (issue 13):

- ``coins``: fair coins on the *same* uniforms (``x = +1`` iff ``r < 1/2``);
- ``anti-walk``: the walk with the drift's sign reversed (``x = +1`` iff ``r < 1/2 + g/(2c)``);
- ``zero``: the estimator that returns 0;
- ``uniform``: uniform sampling without replacement keeping as many tokens as the algorithm.

Statistic. A probabilistic theorem says ``P(stat > bound) <= p`` for each fixed instance element
(direction, query). Over ``trials`` independent runs the number of exceedances is then at most
Binomial(``trials``, ``p``); a side is *within* the bound iff, for every element, its count is at
most :func:`binomial_allowance` (false-alarm probability ``ALPHA`` per element). ``ratio`` is the
empirical ``(1 - p)``-quantile of ``stat / bound`` over trials (worst element): the theorem says it
is at most 1. The algorithm's look-ups go through module attributes (``_walk.self_balancing_walk_batch``,
``_sb.softmax_balance_signs_incremental``, :func:`balance_stream_estimate`, :func:`subgen_estimate`),
which is what the mutation tests replace.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import numpy as np

from .balance import balance_stream_error_bound, softmax_balance_bound
from .subgen import stable_rank, subgen_sample_sizes, subgen_theorem_rhs
from .walk import als_direction_bound, als_failure_probability, als_threshold

# the package re-exports functions with these names, so import the modules themselves
_sb = importlib.import_module("balancekv.reference.softmax_balance")
_walk = importlib.import_module("balancekv.reference.walk")

__all__ = [
    "ALPHA",
    "CheckResult",
    "Side",
    "balance_stream_estimate",
    "binomial_allowance",
    "eq2_stream_check",
    "softmax_balance_check",
    "subgen_check",
    "subgen_estimate",
    "walk_direction_check",
    "walk_fail_check",
]

#: false-alarm probability per element of a correct implementation (a fixed-seed test is deterministic;
#: this is the chance that a random seed would fail a correct one)
ALPHA = 1e-6


def binomial_allowance(trials: int, p: float, alpha: float = ALPHA) -> int:
    """Smallest ``k`` with ``P(Binomial(trials, p) > k) <= alpha``."""
    p = min(max(float(p), 0.0), 1.0)
    if p == 0.0:
        return 0
    if p == 1.0:
        return trials
    logpmf = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + k * math.log(p)
        + (trials - k) * math.log1p(-p)
        for k in range(trials + 1)
    ]
    tail = 0.0
    for k in range(trials, -1, -1):  # tail = P(X > k - 1) after adding pmf(k)
        if tail + math.exp(logpmf[k]) > alpha:
            return k
        tail += math.exp(logpmf[k])
    return 0


@dataclass
class Side:
    """One sign rule or estimator against the bound. ``stat`` and ``bound``: ``(trials, elements)``."""

    name: str
    stat: np.ndarray
    bound: np.ndarray
    p: float  # probability per element the theorem allows
    extra_fail: str = ""  # a reason the side is outside the bound besides exceedances (e.g. FAIL count)
    ratio_value: float | None = None  # reported instead of the quantile ratio (e.g. a FAIL rate / delta)
    allowed_override: int | None = None  # for single-run checks: exceedances allowed (0: every element within)

    @property
    def counts(self) -> np.ndarray:
        return np.count_nonzero(self.stat > self.bound, axis=0)

    @property
    def allowed(self) -> int:
        if self.allowed_override is not None:
            return self.allowed_override
        return binomial_allowance(self.stat.shape[0], self.p)

    @property
    def within(self) -> bool:
        return not self.extra_fail and int(self.counts.max()) <= self.allowed

    @property
    def ratio(self) -> float:
        """Empirical ``(1 - p)``-quantile over trials of ``stat / bound``, worst element."""
        if self.ratio_value is not None:
            return float(self.ratio_value)
        r = self.stat / self.bound
        return float(np.max(np.quantile(r, 1.0 - self.p, axis=0, method="higher")))

    def summary(self) -> dict:
        return dict(
            name=self.name,
            ratio=self.ratio,
            worst_count=int(self.counts.max()),
            allowed=self.allowed,
            trials=int(self.stat.shape[0]),
            elements=int(self.stat.shape[1]),
            within=self.within,
            extra=self.extra_fail,
        )


@dataclass
class CheckResult:
    name: str
    source: str
    bound_fn: str
    regime: str
    algorithm: Side
    controls: list[Side] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def separates(self) -> bool:
        """The algorithm is within the bound and every control outside it."""
        return self.algorithm.within and not any(c.within for c in self.controls)

    def summary(self) -> dict:
        return dict(
            name=self.name,
            source=self.source,
            bound_fn=self.bound_fn,
            regime=self.regime,
            algorithm=self.algorithm.summary(),
            controls=[c.summary() for c in self.controls],
            info=self.info,
        )


# ---------------------------------------------------------------------- controls for the walk
def coin_signs(uniforms) -> np.ndarray:
    """Fair coins on the given uniforms: ``+1`` iff ``r < 1/2``."""
    return np.where(np.asarray(uniforms) < 0.5, 1, -1).astype(np.int8)


def anti_walk_batch(U, uniforms, c, stop_when_all_failed: bool = False):
    """The walk with the drift reversed (``x = +1`` iff ``r < 1/2 + g/(2c)``): pushes away from 0.

    Returns ``(failed_at (B,), end (B, D))``; with ``stop_when_all_failed`` the loop ends once every walk
    has failed (``end`` is then the position at that step)."""
    U = np.asarray(U, np.float64)
    r = np.ascontiguousarray(np.asarray(uniforms, np.float64).T)
    n, D = U.shape
    B = r.shape[1]
    w = np.zeros((B, D))
    failed = np.full(B, -1, np.int64)
    for i in range(n):
        g = w @ U[i]
        bad = (np.abs(g) > c) & (failed < 0)
        if bad.any():
            failed[bad] = i
            if stop_when_all_failed and np.all(failed >= 0):
                break
        w += np.where(r[i] < 0.5 + g / (2 * c), 1.0, -1.0)[:, None] * U[i]
    return failed, w


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------- ALS walk
def walk_direction_check(seed: int = 0, n: int = 100_000, D: int = 2, trials: int = 48, delta: float = 0.01):
    """[ALS] §2, our constants: for a fixed unit ``t``, ``P(|<w_n, t>| > sqrt(4 c log(2/delta_t))) <= delta_t``
    (+ FAIL) at ``c = 30 log(n/delta)``, ``delta_t = 0.05``; ``n >> c D`` so the walk's drift acts.

    Random unit vectors in ``R^D``, ``trials`` walks (fresh uniforms each), 4 random directions and
    ``e_1``. Controls: fair coins and the anti-walk on the same uniforms.
    """
    rng = np.random.default_rng([seed, 13, 1])
    U = _unit(rng.normal(size=(n, D)))
    r = rng.random((trials, n))
    c = als_threshold(n, delta)
    dt = 0.05
    lam = als_direction_bound(c, dt)
    p = dt + als_failure_probability(n, c)
    T = np.vstack([_unit(rng.normal(size=(4, D))), np.eye(D)[:1]])
    signs, failed, end = _walk.self_balancing_walk_batch(U, r, c)
    alg = Side("walk", np.abs(end @ T.T), np.full((trials, T.shape[0]), lam), p)
    nf = int(np.count_nonzero(failed >= 0))
    if nf > binomial_allowance(trials, als_failure_probability(n, c)):
        alg.extra_fail = f"{nf} of {trials} walks FAILed"
    coins = Side("coins", np.abs((coin_signs(r).astype(float) @ U) @ T.T), alg.bound, p)
    afail, aend = anti_walk_batch(U, r, c)
    anti = Side("anti-walk", np.abs(aend @ T.T), alg.bound, p)
    return CheckResult(
        "ALS walk, fixed direction",
        "[ALS] §2; proofs/self_balancing_walk.md",
        "balancekv.bounds.walk.als_direction_bound",
        f"n={n} random unit vectors in R^{D} (n/(cD) = {n / (c * D):.0f}), c = 30 log(n/delta) = {c:.0f}, "
        f"{trials} walks x {T.shape[0]} directions, bound at delta_t = {dt}",
        alg,
        [coins, anti],
        dict(c=c, bound=lam, walk_fails=nf, anti_fails=int(np.count_nonzero(afail >= 0))),
    )


def walk_fail_check(seed: int = 0, n: int = 100_000, trials: int = 48, delta: float = 0.01):
    """[ALS], our constants: ``P(FAIL) <= 2 n e^{-c/4} <= delta`` at ``c = 30 log(n/delta)``.

    Identical unit vectors in ``R^1`` (``n >> c``: the coins' running sum reaches ``c``). The statistic
    is the FAIL indicator; the bound allows ``delta`` per walk (the theorem's bound is far smaller,
    stated in ``info``). Controls: fair coins on the same uniforms (FAIL iff the running sum's
    absolute value exceeds ``c`` before a step) and the anti-walk.
    """
    rng = np.random.default_rng([seed, 13, 2])
    U = np.ones((n, 1))
    r = rng.random((trials, n))
    c = als_threshold(n, delta)
    pf = als_failure_probability(n, c)
    _, failed, _ = _walk.self_balancing_walk_batch(U, r, c)
    S = np.cumsum(coin_signs(r), axis=1, dtype=np.int64)
    coins_fail = np.max(np.abs(S[:, :-1]), axis=1) > c
    afail, _ = anti_walk_batch(U, r, c, stop_when_all_failed=True)
    one = np.ones((trials, 1))

    def side(name, f):
        f = np.asarray(f, bool)
        return Side(name, f[:, None] * 2.0, one, pf, ratio_value=float(f.mean()) / delta)

    return CheckResult(
        "ALS walk, FAIL probability",
        "[ALS] §2; proofs/self_balancing_walk.md",
        "balancekv.bounds.walk.als_failure_probability",
        f"n={n} identical unit vectors in R^1 (n/c = {n / c:.0f}), c = 30 log(n/delta) = {c:.0f}, {trials} walks; "
        f"a walk exceeds iff it FAILs (allowed: Binomial(trials, 2n e^(-c/4) = {pf:.1e})); ratio = FAIL rate / delta",
        side("walk", failed >= 0),
        [side("coins", coins_fail), side("anti-walk", afail >= 0)],
        dict(c=c, theorem_fail_bound=pf),
    )


# ---------------------------------------------------------------------- SoftmaxBalance
def softmax_balance_check(seed: int = 0, n: int = 10_000, trials: int = 64, delta: float = 0.01):
    """[BKV] Thm 3.3, our constants: for a fixed ``q``, with probability ``>= 1 - delta_t - 2n e^{-c/4}``,
    ``|2 sum_{C'} e^{a_i} v_i - sum_i e^{a_i} v_i| <= sqrt(4 c log(2/delta_t)) e^{scale(|q|^2 + r_k^2)/2} r_v``
    (``s = 1``), ``c = 30 log(n/delta)``, ``delta_t = 0.05``.

    The denominator instance (``v_i = 1``, ``s = 1``) on ``n`` keys of norm ``<= 0.5`` in ``R^2`` (the
    kernel's feature vectors are nearly parallel, so ``n >> c`` makes the drift act), ``trials``
    walks by the incremental (Gram-free) walk, 8 queries of norm ``<= 0.5``. Control: fair coins on
    the same uniforms. The largest possible discrepancy, ``sum e^a``, is ``~ n``: about 100x the bound.
    """
    rng = np.random.default_rng([seed, 13, 3])
    d, dt = 2, 0.05
    scale = 1 / math.sqrt(d)
    K = _unit(rng.normal(size=(n, d))) * 0.5 * rng.random((n, 1)) ** 0.5
    V = np.ones((n, 1))
    Q = _unit(rng.normal(size=(8, d))) * rng.uniform(0.2, 0.5, size=(8, 1))
    c = als_threshold(n, delta)
    r = rng.random((trials, n))
    signs, failed = _sb.softmax_balance_signs_incremental(K, V, r, scale=scale, c=c)
    r_k = float(np.linalg.norm(K, axis=1).max())
    bound = np.array([softmax_balance_bound(1, float(np.linalg.norm(q)), r_k, 1.0, scale, c, dt) for q in Q])
    E = np.exp(scale * Q @ K.T)  # (queries, n)

    def disc(x):
        # |2 sum_{C'} e^a - sum e^a| = |sum_i x_i e^a_i| for either class (proofs/softmax_balance.md)
        return np.abs(x.astype(np.float64) @ E.T)

    p = dt + als_failure_probability(n, c)
    alg = Side("walk", disc(signs), np.broadcast_to(bound, (trials, Q.shape[0])), p)
    nf = int(np.count_nonzero(failed >= 0))
    if nf > binomial_allowance(trials, als_failure_probability(n, c)):
        alg.extra_fail = f"{nf} of {trials} walks FAILed"
    coins = Side("coins", disc(coin_signs(r)), alg.bound, p)
    return CheckResult(
        "SoftmaxBalance discrepancy (Thm 3.3)",
        "[BKV] Thm 3.3; proofs/softmax_balance.md",
        "balancekv.bounds.balance.softmax_balance_bound",
        f"one halving of n={n} tokens, s=1 (v=1), keys |k|<=0.5 in R^2, scale r_k^2 = {scale * r_k**2:.2f}, "
        f"c = {c:.0f}, {trials} walks x 8 queries, bound at delta_t = {dt}; sum e^a / bound = "
        f"{float(E.sum(1).min() / bound.max()):.0f}",
        alg,
        [coins],
        dict(c=c, walk_fails=nf),
    )


# ---------------------------------------------------------------------- Eq. 2 / Thm 3.1, 3.4
def _heavy_stream_data(seed: int, n: int, heavy: int, d: int = 2, s: int = 2, queries: int = 8):
    """Keys of norm ~0.1 (near-uniform softmax), values of norm ~1e-5 (one bucket) except ``heavy`` tokens of norm
    in [1, 2): the value mass sits on a few tokens (each heavy bucket holds fewer than ``t`` tokens)."""
    rng = np.random.default_rng([seed, 13, 4])
    K = 0.05 * rng.normal(size=(n, d))
    V = 2.0**-17 * _unit(rng.normal(size=(n, s))) * rng.uniform(1.05, 1.95, size=(n, 1))  # one bucket
    hv = rng.choice(n, size=heavy, replace=False)
    V[hv] = np.array([1.0] + [0.0] * (s - 1)) * rng.uniform(1.0, 1.9, size=(heavy, 1))
    Q = 0.05 * rng.normal(size=(queries, d))
    return K, V, Q


def balance_stream_estimate(K, V, Q, *, t: int, scale: float, seed: int):
    """``z(Q)`` of balance-stream (one head) fed ``K, V`` token by token; also its memory and fallbacks."""
    from balancekv.methods.balance_stream import BalanceKVStream  # noqa: PLC0415
    from balancekv.reference.softmax_attention import weighted_attention  # noqa: PLC0415

    st = BalanceKVStream(1, K.shape[1], V.shape[1], t=t, scale=scale, rng=np.random.default_rng([seed, 5]))
    st.extend(K[None], V[None], np.arange(K.shape[0]))
    sg = st.segments()[0]
    z = weighted_attention(Q[None], sg.keys.dense(), sg.values.dense(), sg.num_logw, sg.den_logw, scale)[0]
    return z, int(st.memory()[0]), int(st.fallbacks)


def _uniform_estimate(K, V, Q, m: int, scale: float, rng) -> np.ndarray:
    from balancekv.reference.sampling import uniform_sample_indices  # noqa: PLC0415
    from balancekv.reference.softmax_attention import attention  # noqa: PLC0415

    idx = uniform_sample_indices(K.shape[0], m, 1, rng)[0]
    return attention(Q, K[idx], V[idx], scale)  # weights n/m cancel in the ratio


def eq2_stream_check(seed: int = 0, n: int = 32 * 1024 + 8, t: int = 1024, heavy: int = 8, delta: float = 1e-3):
    """[BKV] Thm 3.1/3.4 (Eq. 2), our constants, data-dependent form: per query, with probability
    ``>= 1 - delta``, ``||z(q) - Attn(q)|| <= balance_stream_error_bound(K, V, q, t)`` (default
    ``c = 30 log(2t/delta)``; fallbacks asserted absent).

    Regime: ``n = 32 t + heavy`` tokens, so balance-stream keeps about ``2t`` of them (``m / n ~ 1/16``);
    value mass on ``heavy`` tokens (their bucket has fewer than ``t`` tokens and stays exact), the
    other ``32 t`` of norm ``1e-5``; near-uniform softmax. Then the bound is ``~0.4 ||Attn||``. Controls: the zero
    estimator (error ``||Attn||``) and uniform sampling of as many tokens as balance-stream kept
    (expected ``heavy * m / n ~ 1/2`` heavy tokens: it either misses them or over-weights them).
    At this size the walk at the theorem's ``c`` is coin-like and the bound is looser than coins, so
    this check guards the *estimator* (zero mutation), not the walk.
    """
    K, V, Q = _heavy_stream_data(seed, n, heavy)
    scale = 1 / math.sqrt(K.shape[1])
    from balancekv.reference.softmax_attention import attention  # noqa: PLC0415

    exact = attention(Q, K, V, scale)
    bound = np.array([balance_stream_error_bound(K, V, q, t=t, scale=scale, delta=delta) for q in Q])[None]
    z, mem, fallbacks = balance_stream_estimate(K, V, Q, t=t, scale=scale, seed=seed)
    err = np.linalg.norm(z - exact, axis=-1)[None]
    # one stream: every query must be within (a correct implementation fails a random seed with
    # probability <= queries * delta = 0.008); the controls are outside if any query is
    alg = Side("balance-stream", err, bound, delta, allowed_override=0)
    if fallbacks:
        alg.extra_fail = f"{fallbacks} fallbacks (the bound assumes none)"
    zero = Side("zero", np.linalg.norm(exact, axis=-1)[None], bound, delta, allowed_override=0)
    urng = np.random.default_rng([seed, 6])
    uerr = np.stack([np.linalg.norm(_uniform_estimate(K, V, Q, mem, scale, urng) - exact, axis=-1) for _ in range(8)])
    uni = Side(f"uniform (m={mem})", uerr, np.broadcast_to(bound, uerr.shape), delta)
    return CheckResult(
        "BalanceKV streaming attention error (Eq. 2, Thm 3.1/3.4)",
        "[BKV] Alg. 1, Thm 3.1, 3.4; proofs/merge_and_reduce.md",
        "balancekv.bounds.balance.balance_stream_error_bound",
        f"n={n}, t={t}, kept m={mem} tokens (m/n = {mem / n:.3f}), {heavy} heavy-value tokens, keys ~0.05 N(0,I_2), "
        f"8 queries, one stream; bound / ||Attn|| = {float(np.max(bound / np.linalg.norm(exact, axis=-1))):.2f}",
        alg,
        [zero, uni],
        dict(kept=mem, fallbacks=fallbacks),
    )


# ---------------------------------------------------------------------- SubGen Thm 2.4
def subgen_estimate(K, V, Q, *, t: int, s_num: int, m: int, scale: float, seed: int, trials: int):
    """``z`` of offline SubGen for ``trials`` independent sketches: ``(trials, queries, s)``; and kept tokens."""
    from balancekv.api import segments_attention  # noqa: PLC0415
    from balancekv.methods.subgen import state_segments  # noqa: PLC0415
    from balancekv.reference.subgen import subgen_offline  # noqa: PLC0415

    R = trials
    state = subgen_offline(
        np.repeat(K[None], R, 0),
        np.repeat(V[None], R, 0),
        t=t,
        s_num=s_num,
        m=m,
        scale=scale,
        rng=np.random.default_rng([seed, 7]),
    )
    segs = state_segments(state)
    z = segments_attention(segs, np.repeat(Q[None], R, 0), scale)
    return z, int(np.max(np.sum(segs[0].valid(), axis=-1)))


def subgen_check(
    seed: int = 0, n: int = 16_384, heavy: int = 8, eps: float = 0.4, delta: float = 0.1, trials: int = 16
):
    """[SUB] Thm 2.4, our constants: with ``(t, s_num) = subgen_sample_sizes(eps, r, rho, m, srank, delta)``,
    per query ``P(||z - Attn|| > eps ||softmax(Kq)||_2 ||V||_op) <= delta``.

    Regime: two tight key clusters (folded radius ``rho ~ 1e-3``, ``m = 2``); the ``heavy`` tokens hold
    all value mass and carry about a quarter of the attention (their keys are their own cluster, with
    a logit advantage), so the theorem's right side is ``~ eps ||Attn||``. ``s_num`` and ``m t`` are
    far below ``n``. Controls: the zero estimator and uniform sampling of as many tokens as SubGen's
    slots (``s_num + m t``).
    """
    from balancekv.reference.softmax_attention import attention  # noqa: PLC0415
    from balancekv.reference.subgen import fold_scale, greedy_k_center  # noqa: PLC0415

    rng = np.random.default_rng([seed, 13, 5])
    d, s, m = 4, 4, 2
    scale = 1 / math.sqrt(d)
    hv = rng.choice(n, size=heavy, replace=False)
    q0 = np.zeros(d)
    q0[0] = 1.0
    A = math.log((1 / 3) * (n - heavy) / heavy)  # heavy mass ~ 1/4
    K = 1e-3 * rng.normal(size=(n, d)) / scale
    K[hv, 0] += A / scale  # scale * <q0, k_heavy> = A
    V = np.zeros((n, s))
    V[hv] = _unit(rng.normal(size=(heavy, s)) + 3 * np.eye(s)[0]) * rng.uniform(1.0, 1.9, size=(heavy, 1))
    Q = q0 + 0.05 * _unit(rng.normal(size=(4, d)))
    r = float(np.linalg.norm(Q, axis=1).max())
    _, _, dist = greedy_k_center(fold_scale(K, scale), m)
    t, s_num = subgen_sample_sizes(eps, r, float(dist.max()), m, stable_rank(V), delta)
    exact = attention(Q, K, V, scale)
    rhs = subgen_theorem_rhs(Q, K, V, eps, scale)[None]
    z, kept = subgen_estimate(K, V, Q, t=int(t), s_num=int(s_num), m=m, scale=scale, seed=seed, trials=trials)
    err = np.linalg.norm(z - exact[None], axis=-1)
    bnd = np.broadcast_to(rhs, err.shape)
    alg = Side("SubGen", err, bnd, delta)
    zero = Side("zero", np.broadcast_to(np.linalg.norm(exact, axis=-1)[None], err.shape), bnd, delta)
    mu = int(min(n, s_num + m * t))
    urng = np.random.default_rng([seed, 8])
    uerr = np.stack(
        [np.linalg.norm(_uniform_estimate(K, V, Q, mu, scale, urng) - exact, axis=-1) for _ in range(trials)]
    )
    uni = Side(f"uniform (m={mu})", uerr, bnd, delta)
    return CheckResult(
        "SubGen attention error (Thm 2.4)",
        "[SUB] Thm 2.4; proofs/subgen.md",
        "balancekv.bounds.subgen.subgen_theorem_rhs",
        f"n={n}, m={m} clusters, t={t}, s_num={s_num} (s_num + m t = {s_num + m * t}, "
        f"{(s_num + m * t) / n:.3f} n; {kept} distinct tokens kept), {heavy} heavy-value tokens with ~1/4 of the "
        f"attention, eps={eps}, delta={delta}, {trials} sketches x 4 queries; rhs / ||Attn|| = "
        f"{float(np.max(rhs[0] / np.linalg.norm(exact, axis=-1))):.2f}",
        alg,
        [zero, uni],
        dict(t=int(t), s_num=int(s_num), kept=kept),
    )
