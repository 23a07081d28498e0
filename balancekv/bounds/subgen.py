"""SubGen's error bound, [SUB] Theorem 2.4, with the explicit constants derived in ``proofs/subgen.md``.

Setting (one head, one query ``q`` with ``||q|| <= r``, logits ``a_i = scale <q, k_i>``,
``e = (e^{a_i})_i``, ``Z = sum_i e_i``, ``N = V^T e``): SubGen's clustering puts every
folded key ``scale * k`` within ``rho`` of its centre, with ``m`` clusters. Then,
with ``t`` reservoir slots per cluster and ``s_num`` l2 slots,

* denominator, per cluster, union over clusters: each reservoir slot of a cluster is a uniform
  member, whose ``e^{a}`` lies in ``[L, L e^{2 r rho}]``. Multiplicative Chernoff (``eps_Z <= 1``,
  summands in ``[0, U]``, mean of the sum ``>= t L = t U e^{-2 r rho}``) gives [SUB]'s
  ``P(|Z^ - Z| > eps_Z Z) <= 2 m exp(-eps_Z^2 t e^{-2 r rho} / 3)``; Hoeffding gives
  ``2 m exp(-2 t eps_Z^2 / (e^{2 r rho} - 1)^2)``. Both hold; we use the smaller sample size
  (Hoeffding binds for ``2 r rho`` below about 1.8, Chernoff above);
* numerator (exact second moment of l2 sampling, then Markov):
  ``E||N^ - N||^2 = (mu ||e||^2 - ||N||^2) / s_num <= ||V||_F^2 ||e||^2 / s_num``, so
  ``P(||N^ - N|| > eps_N ||e|| ||V||_op) <= srank(V) / (s_num eps_N^2)`` with
  ``srank(V) = ||V||_F^2 / ||V||_op^2 <= min(n, s)``;
* both events fail together with probability ``<= delta_Z + delta_N``; otherwise
  ``||z - Attn(q)|| <= (eps_N + eps_Z) / (1 - eps_Z) * ||softmax(K q)||_2 ||V||_op``.

:func:`subgen_sample_sizes` splits ``eps`` as ``eps_N = eps_Z = eps/3`` and ``delta`` as
``delta/2`` each, which gives the bound ``eps * ||softmax||_2 ||V||_op`` for ``eps <= 1``
with probability ``>= 1 - delta`` (for one query; [SUB] states it w.h.p. via ``log n``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "subgen_combined_eps",
    "subgen_denominator_fail_prob",
    "subgen_denominator_samples",
    "subgen_denominator_samples_chernoff",
    "subgen_denominator_samples_hoeffding",
    "subgen_numerator_fail_prob",
    "subgen_numerator_samples",
    "subgen_sample_sizes",
    "subgen_theorem_rhs",
    "stable_rank",
]


def _check_unit(name: str, x: float, closed_right: bool = False) -> float:
    x = float(x)
    if not (0.0 < x < 1.0 or (closed_right and x == 1.0)):
        raise ValueError(f"{name} must lie in (0, 1{']' if closed_right else ')'}, got {x}")
    return x


def stable_rank(V: np.ndarray) -> float:
    """``||V||_F^2 / ||V||_op^2`` of ``V (n, s)`` (0 for ``V = 0``); at most ``min(n, s)``."""
    V = np.asarray(V, np.float64)
    op = np.linalg.norm(V, 2) if V.size else 0.0
    return float(np.sum(V * V) / op**2) if op > 0 else 0.0


def subgen_denominator_fail_prob(
    t: int, eps_z: float, query_radius: float, cluster_radius: float, clusters: int
) -> float:
    """``min(1, 2 m min(exp(-2 t eps_Z^2 / (e^{2 r rho} - 1)^2), exp(-eps_Z^2 t e^{-2 r rho} / 3)))``.

    Hoeffding and multiplicative Chernoff (``eps_Z <= 1``) for the reservoir estimate of each
    cluster, union over the ``m`` clusters; 0 if ``r rho = 0`` (a cluster of identical logits).
    """
    x = 2.0 * query_radius * cluster_radius
    spread = math.expm1(x)
    if spread == 0.0:
        return 0.0
    hoeff = math.exp(-2.0 * t * eps_z**2 / spread**2)
    chern = math.exp(-(eps_z**2) * t * math.exp(-x) / 3.0) if eps_z <= 1 else 1.0
    return min(1.0, 2.0 * clusters * min(hoeff, chern))


def subgen_denominator_samples_hoeffding(eps_z: float, x: float, clusters: int, fail_prob: float) -> float:
    """``(e^x - 1)^2 ln(2 m / delta_Z) / (2 eps_Z^2)`` with ``x = 2 r rho`` (real-valued)."""
    return math.expm1(x) ** 2 * math.log(2.0 * clusters / fail_prob) / (2.0 * eps_z**2)


def subgen_denominator_samples_chernoff(eps_z: float, x: float, clusters: int, fail_prob: float) -> float:
    """[SUB]'s form: ``3 e^x ln(2 m / delta_Z) / eps_Z^2`` with ``x = 2 r rho`` (real-valued)."""
    return 3.0 * math.exp(x) * math.log(2.0 * clusters / fail_prob) / eps_z**2


def subgen_denominator_samples(
    eps_z: float, query_radius: float, cluster_radius: float, clusters: int, fail_prob: float
) -> int:
    """Smallest ``t >= 1`` certified by :func:`subgen_denominator_fail_prob` ``<= fail_prob``:
    ``t = ceil(min((e^{2 r rho} - 1)^2 / (2 eps_Z^2), 3 e^{2 r rho} / eps_Z^2) * ln(2 m / delta_Z))``.

    The second (multiplicative Chernoff) is [SUB]'s ``e^{2 r rho}`` dependence; the first
    (Hoeffding) is smaller when ``2 r rho`` is small. ``r``: bound on ``||q||``; ``rho``: largest
    distance of a folded key ``scale * k`` to its centre; ``m``: number of clusters. Spreads with
    ``2 r rho > 700`` give ``inf`` (never certified).
    """
    eps_z = _check_unit("eps_z", eps_z)
    fail_prob = _check_unit("fail_prob", fail_prob)
    if query_radius < 0 or cluster_radius < 0 or clusters < 1:
        raise ValueError("query_radius and cluster_radius must be >= 0 and clusters >= 1")
    x = 2.0 * query_radius * cluster_radius
    if x > 700:
        return math.inf
    t = min(
        subgen_denominator_samples_hoeffding(eps_z, x, clusters, fail_prob),
        subgen_denominator_samples_chernoff(eps_z, x, clusters, fail_prob),
    )
    return max(1, math.ceil(t))


def subgen_numerator_fail_prob(s_num: int, eps_n: float, srank: float) -> float:
    """Markov on the exact second moment: ``min(1, srank(V) / (s_num eps_N^2))``."""
    return min(1.0, srank / (s_num * eps_n**2))


def subgen_numerator_samples(eps_n: float, srank: float, fail_prob: float) -> int:
    """Smallest ``s_num >= 1`` with ``srank(V) / (s_num eps_N^2) <= delta_N``: ``ceil(srank / (delta_N eps_N^2))``."""
    eps_n = _check_unit("eps_n", eps_n)
    fail_prob = _check_unit("fail_prob", fail_prob)
    if srank < 0:
        raise ValueError(f"srank must be >= 0, got {srank}")
    return max(1, math.ceil(srank / (fail_prob * eps_n**2)))


def subgen_combined_eps(eps_n: float, eps_z: float) -> float:
    """The attention error factor when both parts succeed: ``(eps_N + eps_Z) / (1 - eps_Z)``."""
    return (eps_n + eps_z) / (1.0 - eps_z)


def subgen_sample_sizes(
    eps: float, query_radius: float, cluster_radius: float, clusters: int, srank: float, fail_prob: float
) -> tuple[int, int]:
    """``(t, s_num)`` for [SUB] Thm 2.4 with our constants: with probability ``>= 1 - fail_prob``
    ``||z - Attn(q)||_2 <= eps ||softmax(K q)||_2 ||V||_op`` for one query with ``||q|| <= r``.

    Split: ``eps_N = eps_Z = eps / 3`` (then ``(2 eps/3) / (1 - eps/3) <= eps`` for ``eps <= 1``),
    ``delta_N = delta_Z = fail_prob / 2``.
    """
    eps = _check_unit("eps", eps, closed_right=True)
    fail_prob = _check_unit("fail_prob", fail_prob)
    t = subgen_denominator_samples(eps / 3, query_radius, cluster_radius, clusters, fail_prob / 2)
    s = subgen_numerator_samples(eps / 3, srank, fail_prob / 2)
    return t, s


def subgen_theorem_rhs(Q: np.ndarray, K: np.ndarray, V: np.ndarray, eps: float, scale: float) -> np.ndarray:
    """``eps ||softmax(scale K q)||_2 ||V||_op`` per query, for ``Q (mq, d)``, ``K (n, d)``, ``V (n, s)``."""
    a = scale * (np.asarray(Q, np.float64) @ np.asarray(K, np.float64).T)
    a = a - a.max(axis=-1, keepdims=True)
    p = np.exp(a)
    p /= p.sum(axis=-1, keepdims=True)
    return eps * np.linalg.norm(p, axis=-1) * np.linalg.norm(np.asarray(V, np.float64), 2)
