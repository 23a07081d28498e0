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

With ``c = 30 log(n/delta)`` the failure bound is ``2 n (delta/n)^7.5 <= delta`` for
``n/delta >= 2``. [ALS] write ``c = 30 log(nT/delta)`` because they also union-bound
over the ``n`` coordinates of an ell_infinity norm; we bound one direction at a time.
"""

from __future__ import annotations

import math

from balancekv.reference.walk import default_threshold

__all__ = ["als_direction_bound", "als_failure_probability", "als_threshold"]


def als_threshold(n: int, delta: float = 0.01) -> float:
    """The default walk threshold ``c = 30 log(n / delta)`` (never below 30)."""
    return default_threshold(n, delta)


def als_failure_probability(n: int, c: float) -> float:
    """Upper bound ``min(1, 2 n exp(-c/4))`` on the probability that a walk over ``n`` vectors FAILs."""
    return min(1.0, 2.0 * n * math.exp(-c / 4.0))


def als_direction_bound(c: float, delta: float) -> float:
    """``lambda = sqrt(4 c log(2/delta))``: for a fixed unit ``t``, ``P(|<w_n, t>| > lambda) <= delta``.

    Holds on the event the walk does not fail (add :func:`als_failure_probability`).
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    return math.sqrt(4.0 * c * math.log(2.0 / delta))
