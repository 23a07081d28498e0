"""Exact softmax attention and the weighted-token estimator (SPEC sections 0 and 1).

Definitions, in NumPy float64, written for clarity rather than speed.

For a query ``q`` and logits ``a_i = scale * <q, k_i>``::

    Attn(q) = sum_i exp(a_i) v_i / sum_i exp(a_i)

and for a compressed cache with log-weights ``num_logw``, ``den_logw``::

    z(q) = sum_i exp(a_i + num_logw_i) v_i / sum_i exp(a_i + den_logw_i)

Every exponential is taken after subtracting the largest exponent of its own
sum, so keys of norm 1e4 do not overflow; a log-weight of ``-inf`` removes a
slot from that sum.
"""

from __future__ import annotations

import numpy as np


def default_scale(d: int, scale: float | None = None) -> float:
    """``1/sqrt(d)`` unless a scale is given (SPEC section 0)."""
    return float(scale) if scale is not None else 1.0 / np.sqrt(d)


def logits(Q: np.ndarray, K: np.ndarray, scale: float) -> np.ndarray:
    """``a[..., j, i] = scale * <q_j, k_i>`` for queries ``(..., m, d)`` and keys ``(..., n, d)``."""
    return scale * np.einsum("...jd,...id->...ji", Q, K)


def causal_mask(m: int, n: int) -> np.ndarray:
    """Query ``j`` of the last ``m`` positions sees keys ``0 .. n - m + j`` (bottom-right aligned)."""
    return np.arange(n)[None, :] <= (n - m + np.arange(m))[:, None]


def _log_sum(a: np.ndarray, v: np.ndarray | None):
    """``(M, S)`` with ``sum_i exp(a_i) v_i = exp(M) * S`` computed stably along the last axis of ``a``.

    ``a`` may contain ``-inf``; if every entry of a row is ``-inf``, ``M = -inf`` and ``S = 0``.
    """
    M = np.max(a, axis=-1, keepdims=True)
    Msafe = np.where(np.isfinite(M), M, 0.0)
    e = np.exp(a - Msafe)
    S = e.sum(axis=-1, keepdims=True) if v is None else e @ v
    return M[..., 0], S


def weighted_attention(Q, K, V, num_logw, den_logw, scale=None, mask=None) -> np.ndarray:
    """The estimator ``z(q)`` of SPEC section 1 for every query in ``Q``.

    Shapes: ``Q (..., m, d)``, ``K (..., n, d)``, ``V (..., n, s)``, log-weights ``(..., n)``;
    ``mask`` (optional, broadcastable to ``(..., m, n)``) removes slots per query.
    Returns ``(..., m, s)``. Raises ``FloatingPointError`` if a query has no slot in the
    denominator (the estimate would be 0/0).
    """
    Q, K, V = (np.asarray(x, dtype=np.float64) for x in (Q, K, V))
    scale = default_scale(K.shape[-1], scale)
    a = logits(Q, K, scale)
    if mask is not None:
        a = np.where(mask, a, -np.inf)
    num_a = a + np.asarray(num_logw, dtype=np.float64)[..., None, :]
    den_a = a + np.asarray(den_logw, dtype=np.float64)[..., None, :]
    Mn, Sn = _log_sum(num_a, V)
    Md, Sd = _log_sum(den_a, None)
    if np.any(~np.isfinite(Md)) or np.any(Sd <= 0):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    # exp(Mn - Md) * Sn / Sd, with exp(-inf) = 0 when the numerator is empty.
    rel = np.where(np.isfinite(Mn), Mn - Md, -np.inf)
    with np.errstate(over="raise"):
        return np.exp(rel)[..., None] * Sn / Sd


def attention(Q, K, V, scale=None, causal: bool = False) -> np.ndarray:
    """Exact softmax attention ``Attn(q)`` (optionally causal, bottom-right aligned)."""
    n = np.shape(K)[-2]
    zeros = np.zeros(np.shape(K)[:-1])
    mask = causal_mask(np.shape(Q)[-2], n) if causal else None
    return weighted_attention(Q, K, V, zeros, zeros, scale, mask=mask)


def relative_error(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``||approx - exact||_2 / ||exact||_2`` per query (last axis reduced).

    ``0/0`` is 0 (a zero output reproduced exactly); ``x/0`` for ``x > 0`` is ``inf``.
    """
    a, e = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    # norms of values near 1e154 would overflow when squared: divide both by a per-query power of two
    m = np.maximum(
        np.abs(e).max(axis=-1, keepdims=True, initial=0.0), np.abs(a).max(axis=-1, keepdims=True, initial=0.0)
    )
    u = np.exp2(np.ceil(np.log2(np.where((m > 0) & np.isfinite(m), m, 1.0))))
    num = np.linalg.norm(a / u - e / u, axis=-1)
    den = np.linalg.norm(e / u, axis=-1)
    out = np.zeros_like(num)
    pos = den > 0
    out[pos] = num[pos] / den[pos]
    out[~pos & (num > 0)] = np.inf
    return out
