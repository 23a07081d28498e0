"""Bounds for the self-balancing walk [ALS, arXiv 2006.14009] (``proofs/self_balancing_walk.md``).

Convention (stated once, here and in the proof): the walk runs with threshold
``c`` on vectors of norm at most 1. We use the sub-Gaussian form of the [ALS]
analysis (Section 2 there): as long as the walk has not failed, for every fixed
vector ``theta``::

    E exp(<theta, w_i>) <= exp(c ||theta||^2)             (variance proxy 2c)

(the one-dimensional walk with unit steps has stationary variance about ``c/2``,
so the proxy ``2c`` is not tight; our tests check its consequences). From it:

- failure: ``P(FAIL) <= sum_i P(|<w_{i-1}, u_i>| > c) <= 2 n exp(-c/4)``;
- a fixed unit direction ``t``: ``P(|<w_n, t>| > sqrt(4 c log(2/delta))) <= delta``.

**Hypothesis on c (enforced).** The mgf claim is false for small ``c``: on
orthonormal vectors the walk sees ``g = 0`` at every step, its signs are fair
coins and ``<w_n, t>`` is (nearly) standard normal for ``t = sum_i u_i / sqrt(n)``,
so proxy ``2c`` needs ``c >= 1/2`` (at ``c = 0.1`` the claimed 95% bound 1.21 is
exceeded with probability 0.23, ``tests/test_walk.py``). [ALS] state and prove it at
their threshold ``30 log(.)``; we claim it only for ``c >= ALS_C_MIN = 30`` (the floor of
:func:`als_threshold`), and the walk theorem for ``n`` vectors at failure probability
``delta`` only for ``c >= als_threshold(n, delta)``:
:func:`check_theorem_threshold` raises ``ValueError`` below it (``guarantee="theorem"``
uses it). With ``c = 30 log(n/delta)`` the failure bound is ``2 n (delta/n)^7.5 <= delta``
for ``n/delta >= 2``. [ALS] write ``c = 30 log(nT/delta)`` because they also union-bound
over the ``n`` coordinates of an ell_infinity norm; we bound one direction at a time.

**Practical threshold (no theorem).** At the theorem's ``c`` the drift ``g/(2c)`` is tiny and
the walk is coin-like unless ``n >> c D``. :data:`PRACTICAL_THRESHOLD_FACTOR` is the smallest
``k`` on a grid for which ``c = k log(n/delta)`` kept the measured FAIL frequency at most
``delta`` on every family and size of ``benchmarks/walk_threshold.py`` (identical, random in
``R^2`` and ``R^16``, nearly parallel; ``n = 10^3 .. 10^5``; 200 walks each).
:func:`practical_threshold` returns it; it is an empirical setting for
``guarantee != "theorem"``, and no bound function here accepts it.
"""

from __future__ import annotations

import math

from balancekv.reference.walk import default_threshold

__all__ = [
    "ALS_C_MIN",
    "PRACTICAL_THRESHOLD_FACTOR",
    "als_direction_bound",
    "als_failure_probability",
    "als_threshold",
    "check_theorem_threshold",
    "practical_threshold",
]

#: smallest threshold for which the mgf (sub-Gaussian) claim is used (the floor of ``als_threshold``)
ALS_C_MIN = 30.0

#: measured by ``benchmarks/walk_threshold.py`` (``benchmarks/results/walk_threshold.json``)
PRACTICAL_THRESHOLD_FACTOR = 1.0


def als_threshold(n: int, delta: float = 0.01) -> float:
    """The default walk threshold ``c = 30 log(n / delta)`` (never below 30)."""
    return default_threshold(n, delta)


def practical_threshold(n: int, delta: float = 0.01) -> float:
    """``c = PRACTICAL_THRESHOLD_FACTOR * log(n / delta)``: empirically FAIL-free, no theorem (module docstring)."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return PRACTICAL_THRESHOLD_FACTOR * max(1.0, math.log(n / delta))


def check_theorem_threshold(c: float, n: int, delta: float) -> float:
    """Return ``c`` if the walk theorem holds for ``n`` vectors at ``delta`` (``c >= als_threshold(n, delta)``).

    Raises ``ValueError`` naming ``c`` otherwise: below it [ALS]'s failure bound exceeds ``delta``
    or the mgf claim is not established (module docstring).
    """
    c = float(c)
    need = als_threshold(n, delta)
    if not c >= need * (1 - 1e-12):
        raise ValueError(
            f"c = {c:.6g} is below the walk theorem's threshold 30 log(n/delta) = {need:.6g} "
            f"(n = {n}, delta = {delta}); guarantee='theorem' needs c >= that (or c=None)"
        )
    return c


def als_failure_probability(n: int, c: float) -> float:
    """Upper bound ``min(1, 2 n exp(-c/4))`` on the probability that a walk over ``n`` vectors FAILs."""
    return min(1.0, 2.0 * n * math.exp(-c / 4.0))


def als_direction_bound(c: float, delta: float) -> float:
    """``lambda = sqrt(4 c log(2/delta))``: for a fixed unit ``t``, ``P(|<w_n, t>| > lambda) <= delta``.

    Holds on the event the walk does not fail (add :func:`als_failure_probability`), for
    ``c >= ALS_C_MIN`` (``ValueError`` below: the claim is false for small ``c``).
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not float(c) >= ALS_C_MIN:
        raise ValueError(
            f"c = {c:.6g} is below ALS_C_MIN = {ALS_C_MIN:g}: the walk's sub-Gaussian bound is not claimed"
        )
    return math.sqrt(4.0 * c * math.log(2.0 / delta))
