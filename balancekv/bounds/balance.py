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

from .walk import als_direction_bound, als_failure_probability, als_threshold

__all__ = [
    "balance_stream_error_bound",
    "balance_stream_theorem_t",
    "lower_bound_space_order",
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
    return math.sqrt(s) * lam * math.exp(scale * (q_norm**2 + r_k**2) / 2.0) * r_v


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
    weight ``2^l``; each errs by at most ``2^l`` times :func:`softmax_balance_bound` (threshold
    ``c``, default ``30 log(2t/delta)``, per-reduction failure ``delta / R``, ``R = sum_l N_l``)::

        error <= sum_l N_l 2^l D,     D = softmax_balance_bound(s, ||q||, r_k, r_v, scale, c, delta / R)

    with probability ``>= 1 - delta - R * 2 (2t) exp(-c/4)``. The sum is ``<= (n / 2t) L D`` for
    ``L`` levels: relative to ``Z >= n e^{-scale ||q|| r_k}`` this is the ``1/t`` rate of Thm 3.4.
    """
    counts = _reduction_counts(n, t)
    R = sum(counts)
    if R == 0:
        return 0.0
    c = als_threshold(2 * t, delta) if c is None else c
    D = softmax_balance_bound(s, q_norm, r_k, r_v, scale, c, delta / R)
    return float(sum(N * 2**l for l, N in enumerate(counts)) * D)


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

    using ``z - N/Z = (dN - (N/Z) dZ) / (Z + dZ)``. Holds with probability ``>= 1 - (B + 1) delta``
    minus the failure terms, ``B`` the number of buckets. Exponentials are taken relative to
    ``max_i a_i`` (the common factor cancels), so large norms do not overflow.
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
    for bucket in np.unique(b[keep & (vn > 0)]):
        sel = keep & (b == bucket)
        EN += merge_reduce_sum_error_bound(int(sel.sum()), t, s, qn, r_k, float(vn[sel].max()), scale, delta, c) * shift
    EZ = merge_reduce_sum_error_bound(n, t, 1, qn, r_k, 1.0, scale, delta, c) * shift
    if not EZ < Z:
        return math.inf
    return (EN + float(np.linalg.norm(attn)) * EZ) / (Z - EZ)


def balance_stream_theorem_t(
    K, V, eps: float, *, scale: float, r: float | None = None, delta: float = 0.01, c: float | None = None
) -> int | None:
    """The batch size ``t`` that Thm 3.1 [BKV] (our constants) certifies for Eq. 2 at precision ``eps``.

    Eq. 2: ``||z(q) - Attn(q)|| <= eps ||softmax(Kq)||_2 ||V||_F`` for every fixed ``q`` with
    ``||q|| <= r`` (default ``r = max ||k_i||``). Half of ``eps`` goes to bucket erasure (exact
    rule in ``proofs/merge_reduce.md``); the other half must cover balancing, with the worst
    case over ``||q|| <= r``: ``Z >= n e^{-scale r r_k}``, ``||Attn|| <= max ||v||`` and
    ``||softmax||_2 >= 1/sqrt(n)``. Returns the smallest power-of-two ``t < n`` that meets it,
    or ``None`` when only the exact cache is certified.
    """
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    n, s = V.shape
    vn = np.linalg.norm(V, axis=1)
    fro = float(np.sqrt(np.sum(vn**2)))
    r_k = float(np.max(np.linalg.norm(K, axis=1)))
    r = r_k if r is None else float(r)
    target = 0.5 * eps * fro / math.sqrt(n)
    b = value_norm_bucket(vn)
    Zlow = n * math.exp(-scale * r * r_k)
    t = 1
    while t < n:
        EN = sum(
            merge_reduce_sum_error_bound(int((b == u).sum()), t, s, r, r_k, float(vn[b == u].max()), scale, delta, c)
            for u in np.unique(b[vn > 0])
        )
        EZ = merge_reduce_sum_error_bound(n, t, 1, r, r_k, 1.0, scale, delta, c)
        if EZ < Zlow and (EN + float(vn.max()) * EZ) / (Zlow - EZ) <= target:
            return t
        t *= 2
    return None


def lower_bound_space_order(eps: float, d: int, r: float, scale: float) -> float:
    """Thm 3.2 of [BKV]: for ``r^2 <= d`` any streaming algorithm meeting Eq. 2 with probability
    0.999 stores ``Omega(min(1/eps^2, d e^{2 scale r^2}))`` words. Returns the expression inside
    ``Omega`` (the paper states no constant; see ``proofs/lower_bound.md``)."""
    return min(1.0 / eps**2, d * math.exp(2.0 * scale * r**2))
