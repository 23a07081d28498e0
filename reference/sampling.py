"""Uniform sampling of tokens (SPEC section 4c), the baseline BalanceKV is measured against.

Keeping ``m`` of ``n`` tokens uniformly without replacement and weighting each
by ``n/m`` gives unbiased estimates of the numerator and denominator sums;
their relative error falls like ``1/sqrt(m)`` (sampling variance), against the
``1/m`` of discrepancy-based halving [BKV].
"""

from __future__ import annotations

import numpy as np


def uniform_sample_indices(n: int, m: int, heads: int, rng: np.random.Generator) -> np.ndarray:
    """``(heads, m)`` sorted token indices, each row ``m`` distinct draws from ``range(n)``."""
    if not 1 <= m <= n:
        raise ValueError(f"m must lie in [1, n={n}], got {m}")
    keys = rng.random((heads, n))
    idx = np.argsort(keys, axis=-1, kind="stable")[:, :m]
    return np.sort(idx, axis=-1)
