"""Bounds for SoftmaxBalance, MergeAndReduce and BalanceKV [BKV, arXiv 2502.07861].

Every constant is explicit; the proofs are in ``proofs/softmax_balance.md``,
``proofs/merge_reduce.md`` and ``proofs/lower_bound.md``. All bounds rest on the
walk bound of :mod:`balancekv.bounds.walk` (variance proxy ``2c``).

Notation: ``s`` value dimension, ``scale`` logit scale, ``r_k = max ||k_i||``,
``r_v = max ||v_i||``, ``||q||`` the query norm, ``c`` the walk threshold.
"""

from __future__ import annotations

import math

import numpy as np

from .walk import als_direction_bound, als_failure_probability, als_threshold, check_theorem_threshold

__all__ = [
    "balance_stream_error_bound",
    "balance_stream_theorem_t",
    "lower_bound_space_order",
    "balance_stream_failure_split",
    "merge_reduce_failure_probability",
    "merge_reduce_memory_bound",
    "merge_reduce_sum_error_bound",
    "softmax_balance_bound",
    "softmax_balance_failure_probability",
    "value_norm_bucket",
]


def softmax_balance_bound(s: int, q_norm: float, r_k: float, r_v: float, scale: float, c: float, delta: float) -> float:
    """Thm 3.3 of [BKV] with our constants: the discrepancy of one SoftmaxBalance halving.

    With probability at least ``1 - delta - softmax_balance_failure_probability(n, c)``, for a
    fixed query ``q``::

        || 2 sum_{C'} e^{a_i} v_i - sum_i e^{a_i} v_i ||_2
            <= sqrt(s) * sqrt(4 c log(2 s / delta)) * exp(scale (||q||^2 + r_k^2) / 2) * r_v

    (denominator: ``s = 1``, ``r_v = 1``). [BKV] state ``O(sqrt(s) log(ns/delta) ...)``; with
    ``c = 30 log(n/delta)`` ours is ``sqrt(120 log(n/delta) log(2s/delta))``, the same order.
    """
    lam = als_direction_bound(c, min(delta / max(s, 1), 0.999999))
    # in log space: at key norms of 30 and more the exponential alone overflows a float; the bound
    # is then +inf (uninformative: the theorem certifies only the exact cache)
    log_b = 0.5 * math.log(s) + math.log(lam) + scale * (q_norm**2 + r_k**2) / 2.0 + math.log(max(r_v, 1e-300))
    return math.exp(log_b) if log_b < 709.0 else math.inf


def softmax_balance_failure_probability(n: int, c: float) -> float:
    """Probability bound that the walk inside SoftmaxBalance FAILs (``2 n exp(-c/4)``)."""
    return als_failure_probability(n, c)


def value_norm_bucket(norms) -> np.ndarray:
    """Bucket index ``i`` with ``2^(i-1) <= ||v|| < 2^i`` (``np.frexp`` exponent); ``-10^6`` for ``||v|| = 0``."""
    norms = np.asarray(norms, np.float64)
    _, e = np.frexp(norms)
    return np.where(norms > 0, e, -(10**6)).astype(np.int64)


def merge_reduce_memory_bound(n: int, t: int) -> int:
    """Tokens held by one MergeAndReduce instance after ``n`` tokens (no fallbacks):
    ``n`` if ``n < t``, else ``t * (2 + floor(log2(floor(n/t))))`` (buffer ``< t`` plus one set
    of ``<= t`` tokens per level ``0 .. floor(log2(n/t))``)."""
    if n < t:
        return int(n)
    return int(t * (2 + int(math.floor(math.log2(n // t)))))


def _reduction_counts(n: int, t: int) -> list[int]:
    """Reductions performed at each level ``l`` after ``n`` tokens: ``floor(n / (t 2^(l+1)))``."""
    out, l = [], 0
    while n // (t * 2 ** (l + 1)) > 0:
        out.append(n // (t * 2 ** (l + 1)))
        l += 1
    return out


def merge_reduce_sum_error_bound(
    n: int, t: int, s: int, q_norm: float, r_k: float, r_v: float, scale: float, delta: float, c: float | None = None
) -> float:
    """Thm 3.4 of [BKV], one instance: ``|| sum_stored w e^a v - sum_all e^a v ||_2`` after ``n`` tokens.

    Level ``l`` performs ``N_l = floor(n / (t 2^(l+1)))`` reductions of at most ``2t`` tokens of
    weight ``2^l`` (fewer when a kept class was smaller than half: the walk's threshold there,
    ``30 log(|merged|/delta)``, is at most the ``c`` used here, so ``D`` is conservative); each errs
    by at most ``2^l`` times :func:`softmax_balance_bound` (threshold ``c``, default
    ``30 log(2t/delta)``, per-reduction level ``delta / (3R)``, ``R = sum_l N_l``; the factor 3 pays
    for retrying all-equal sign vectors, which conditions on an event of probability
    ``>= 1/2 - 1/(2c) >= 1/3``)::

        error <= sum_l N_l 2^l D,     D = softmax_balance_bound(s, ||q||, r_k, r_v, scale, c, delta / (3R))

    with probability ``>= 1 - delta - merge_reduce_failure_probability(n, t, c)``, on the event
    that no set fell back to exact storage (a fallback pushes up a set of more than ``t`` tokens,
    whose later reductions the bound does not cover: callers assert ``fallbacks == 0``). The sum is
    ``<= (n / 2t) L D`` for ``L`` levels: relative to ``Z >= n e^{-scale ||q|| r_k}`` this is the
    ``1/t`` rate of Thm 3.4.
    """
    counts = _reduction_counts(n, t)
    R = sum(counts)
    if R == 0:
        return 0.0
    c = als_threshold(2 * t, delta) if c is None else check_theorem_threshold(c, 2 * t, delta)
    # delta / (3R) per reduction: a reduction whose signs are all equal is retried, i.e. the kept signs are
    # conditioned on "not all equal", of probability >= 1 - P(x_2 = x_1) >= 1/2 - 1/(2c) >= 1/3 (c >= 3),
    # which at most triples that reduction's failure probability
    D = softmax_balance_bound(s, q_norm, r_k, r_v, scale, c, delta / (3 * R))
    return float(sum(N * 2**l for l, N in enumerate(counts)) * D)


def merge_reduce_failure_probability(n: int, t: int, c: float | None = None, delta: float = 0.01) -> float:
    """Probability bound that some walk of one instance over ``n`` tokens FAILs: ``R * 2 (2t) e^{-c/4}``.

    ``R = sum_l N_l`` reductions of at most ``2t`` tokens at threshold ``c`` (default
    ``30 log(2t/delta)``; a reduction's own default threshold ``30 log(|merged|/delta)`` fails with
    probability at most ``2 |merged| (delta/|merged|)^7.5``, below this). Not included: fallbacks
    after ``max_retries`` all-equal sign vectors, which happen only for tiny merged sets (two tokens:
    probability 1/16 with 3 retries) and are asserted absent by the checks (``fallbacks == 0``).
    """
    R = sum(_reduction_counts(n, t))
    if R == 0:
        return 0.0
    c = als_threshold(2 * t, delta) if c is None else float(c)
    return min(1.0, R * als_failure_probability(2 * t, c))


def balance_stream_failure_split(delta: float, instances: int) -> float:
    """Per-instance discrepancy level of a composed guarantee over ``instances`` MergeAndReduce instances.

    The overall failure probability ``delta`` is split as ``delta/2`` for the walk FAILs / fallbacks
    of all instances (checked against :func:`merge_reduce_failure_probability`) and ``delta/2`` shared
    equally by the instances' discrepancy bounds: each gets ``delta / (2 * instances)``.
    """
    return float(delta) / (2.0 * max(1, int(instances)))


def balance_stream_error_bound(
    K, V, q, *, t: int, scale: float, delta: float = 0.01, c: float | None = None, erased=None
) -> float:
    """Data-dependent form of Thm 3.1/3.4 [BKV] for ``balance-stream``: a bound on ``||z(q) - Attn(q)||_2``.

    ``K (n, d)``, ``V (n, s)``: the tokens seen so far (one head); ``erased``: indices of tokens the
    stream dropped from the numerator (bucket erasure). With ``Z = sum e^{a_i}``, ``N = sum e^{a_i} v_i``::

        E_N = sum_buckets merge_reduce_sum_error_bound(n_b, t, s, ||q||, r_k, r_v,b)
              + sum_{erased} e^{a_j} ||v_j||
        E_Z = merge_reduce_sum_error_bound(n, t, 1, ||q||, r_k, 1)
        ||z - Attn|| <= (E_N + ||Attn|| E_Z) / (Z - E_Z)         (inf if E_Z >= Z)

    using ``z - N/Z = (dN - (N/Z) dZ) / (Z + dZ)``. **Overall failure probability: ``delta``.** The
    ``B + 1`` instances (``B`` value-norm buckets and the denominator) each get the discrepancy level
    ``delta / (2 (B + 1))`` (:func:`balance_stream_failure_split`); the other ``delta / 2`` covers
    every walk FAIL and fallback (:func:`merge_reduce_failure_probability`, summed over instances;
    if that sum exceeds ``delta/2`` the bound is ``inf``). Outside that event no set fell back, which
    is what the bound assumes. ``c``: ``None`` (default ``30 log(2t/delta)``) or at least that
    (``ValueError`` naming ``c`` below it). Exponentials are taken relative to ``max_i a_i``
    (the common factor cancels), so large norms do not overflow.
    """
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    q = np.asarray(q, np.float64)
    n, s = V.shape
    a = scale * (K @ q)
    M = float(a.max())
    e = np.exp(a - M)
    Z = float(e.sum())
    attn = (e @ V) / Z
    r_k = float(np.sqrt(np.max(np.sum(K * K, axis=1))))
    qn = float(np.linalg.norm(q))
    shift = math.exp(-M) if -M < 700 else math.inf
    vn = np.linalg.norm(V, axis=1)
    keep = np.ones(n, bool)
    EN = 0.0
    if erased is not None and len(erased):
        er = np.asarray(erased, np.int64)
        keep[er] = False
        EN += float(e[er] @ vn[er])
    b = value_norm_bucket(vn)
    buckets = np.unique(b[keep & (vn > 0)])
    dinst = balance_stream_failure_split(delta, len(buckets) + 1)
    fail = merge_reduce_failure_probability(n, t, c, delta)
    for bucket in buckets:
        sel = keep & (b == bucket)
        nb = int(sel.sum())
        fail += merge_reduce_failure_probability(nb, t, c, delta)
        EN += merge_reduce_sum_error_bound(nb, t, s, qn, r_k, float(vn[sel].max()), scale, dinst, c) * shift
    EZ = merge_reduce_sum_error_bound(n, t, 1, qn, r_k, 1.0, scale, dinst, c) * shift
    if fail > delta / 2 or not EZ < Z:
        return math.inf
    return (EN + float(np.linalg.norm(attn)) * EZ) / (Z - EZ)


def balance_stream_theorem_t(
    K, V, eps: float, *, scale: float, r: float | None = None, delta: float = 0.01, c: float | None = None
) -> int | None:
    """The batch size ``t`` that Thm 3.1 [BKV] (our constants) certifies for Eq. 2 at precision ``eps``.

    Eq. 2: ``||z(q) - Attn(q)|| <= eps ||softmax(Kq)||_2 ||V||_F`` for every fixed ``q`` with
    ``||q|| <= r`` (default ``r = max ||k_i||``), with overall failure probability ``delta`` per query
    (split as in :func:`balance_stream_error_bound`). Erasure (exact rule in
    ``proofs/merge_reduce.md``) moves the numerator by at most ``(eps/2) ||e||_2 ||V||_F``; with the
    balancing errors ``E_N``, ``E_Z`` and ``x = ||softmax||_2 ||V||_F``::

        ||z - Attn|| <= ((eps/2) x Z + E_N + ||Attn|| E_Z) / (Z - E_Z) <= eps x
        <=>  E_N / Z + ||Attn|| E_Z / Z <= eps x (1/2 - E_Z / Z)

    (the erasure term is divided by the *estimate* ``Z - E_Z``, not by ``Z``, hence the
    ``1/2 - E_Z/Z``). Worst case over ``||q|| <= r``: ``Z >= n e^{-scale r r_k}``,
    ``||Attn|| <= max ||v||``, ``x >= ||V||_F / sqrt(n)``. Returns the smallest power-of-two
    ``t < n`` meeting it, or ``None`` when only the exact cache is certified. ``c`` (if given)
    must be at least ``30 log(2t/delta)`` (``ValueError`` naming ``c`` if it is below that even for
    ``t = 1``; larger ``t`` for which it is too small are not offered).
    """
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    n, s = V.shape
    vn = np.linalg.norm(V, axis=1)
    fro = float(np.sqrt(np.sum(vn**2)))
    r_k = float(np.max(np.linalg.norm(K, axis=1)))
    r = r_k if r is None else float(r)
    if c is not None:
        check_theorem_threshold(c, 2, delta)
    xmin = eps * fro / math.sqrt(n)
    b = value_norm_bucket(vn)
    buckets = np.unique(b[vn > 0])
    dinst = balance_stream_failure_split(delta, len(buckets) + 1)
    # Z >= n e^{-scale r r_k}, kept in log space (it underflows to 0 at key norms of 30 and more)
    log_zlow = math.log(n) - scale * r * r_k

    def over_z(x: float) -> float:
        return x * math.exp(-log_zlow) if -log_zlow < 709.0 else (0.0 if x == 0 else math.inf)

    t = 1
    while t < n:
        if c is not None and c < als_threshold(2 * t, delta):
            return None
        fail = merge_reduce_failure_probability(n, t, c, delta) + sum(
            merge_reduce_failure_probability(int((b == u).sum()), t, c, delta) for u in buckets
        )
        EN = sum(
            merge_reduce_sum_error_bound(int((b == u).sum()), t, s, r, r_k, float(vn[b == u].max()), scale, dinst, c)
            for u in buckets
        )
        EZ = merge_reduce_sum_error_bound(n, t, 1, r, r_k, 1.0, scale, dinst, c)
        rho = over_z(EZ)
        if fail <= delta / 2 and rho < 0.5 and over_z(EN) + float(vn.max()) * rho <= xmin * (0.5 - rho):
            return t
        t *= 2
    return None


def lower_bound_space_order(eps: float, d: int, r: float, scale: float) -> float:
    """Thm 3.2 of [BKV]: for ``r^2 <= d`` any streaming algorithm meeting Eq. 2 with probability
    0.999 stores ``Omega(min(1/eps^2, d e^{2 scale r^2}))`` words. Returns the expression inside
    ``Omega`` (the paper states no constant; see ``proofs/lower_bound.md``)."""
    x = 2.0 * scale * r**2
    return min(1.0 / eps**2, d * math.exp(x) if x < 709.0 else math.inf)
