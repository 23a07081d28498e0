"""SoftmaxBalance: the self-balancing walk in the softmax kernel's feature space [BKV, Alg. 2, Thm 3.3].

The walk runs on the implicit vectors ``u_i = phi(k_i) (x) v_i / R`` of the kernel::

    kappa_ij = exp(scale <k_i, k_j>) <v_i, v_j>,    R^2 = exp(scale r_k^2) r_v^2,

with ``r_k = max ||k_i||``, ``r_v = max ||v_i||``, so ``||u_i|| <= 1`` and only the
Gram entries ``kappa_ij / R^2`` are needed (SPEC section 3). For every query ``q``
the signed sum ``sum_i x_i exp(scale <q, k_i>) v_i`` is the inner product of the
walk's end point with ``phi(q) (x) e_l`` per coordinate ``l``; keeping the
smaller sign class ``C'`` with weight 2 makes ``2 sum_{C'} - sum_all`` equal to
that signed sum up to sign. Its size is bounded by
:func:`balancekv.bounds.balance.softmax_balance_bound` (``proofs/softmax_balance.md``).

The denominator is the same walk with scalar values ``v_i = 1``.

Computation is stable: ``kappa_ij / R^2 = exp(scale (<k_i,k_j> - r_k^2)) <v_i,v_j> / r_v^2``
has a non-positive exponent (Cauchy–Schwarz), so keys of norm 1e4 do not overflow.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .walk import WalkFailure, default_threshold, gram_walk_signs

__all__ = [
    "BalanceHalf",
    "normalized_softmax_gram",
    "softmax_balance",
    "softmax_balance_signs",
    "softmax_balance_signs_incremental",
]


class BalanceHalf(NamedTuple):
    """The kept half: ``indices`` (sorted, into the input), ``log_weights`` (all ``log 2``), ``signs``."""

    indices: np.ndarray
    log_weights: np.ndarray
    signs: np.ndarray


def normalized_softmax_gram(K, V, scale: float) -> np.ndarray:
    """``kappa_ij / R^2`` for keys ``(B, n, d)`` and values ``(B, n, s)`` -> ``(B, n, n)``.

    ``r_k`` and ``r_v`` are maxima per problem ``b``. All-zero values give the zero matrix
    (every vector ``u_i`` is 0; any signs are exact).
    """
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    rk2 = np.max(np.einsum("bnd,bnd->bn", K, K), axis=-1)  # (B,)
    rv2 = np.max(np.einsum("bns,bns->bn", V, V), axis=-1)  # (B,)
    expo = K @ np.swapaxes(K, -1, -2)  # (B, n, n); matmul, not einsum: same values, much faster for small d
    expo -= rk2[:, None, None]
    expo *= scale
    np.minimum(expo, 0.0, out=expo)  # exact value is <= 0; clip rounding noise
    np.exp(expo, out=expo)
    expo *= V @ np.swapaxes(V, -1, -2)
    safe = np.where(rv2 > 0, rv2, 1.0)
    expo /= safe[:, None, None]
    return expo


def softmax_balance_signs(K, V, uniforms, *, scale: float, c=None, delta: float = 0.01):
    """Walk signs for ``B`` independent SoftmaxBalance problems.

    ``K (B, n, d)``, ``V (B, n, s)``, ``uniforms (B, n)``; ``c`` defaults to
    ``default_threshold(n, delta)``. Returns ``(signs (B, n) int8, failed_at (B,))`` as
    :func:`balancekv.reference.walk.gram_walk_signs` (``failed_at = -1``: no FAIL).
    """
    K = np.asarray(K, np.float64)
    n = K.shape[-2]
    c = default_threshold(n, delta) if c is None else c
    return gram_walk_signs(normalized_softmax_gram(K, V, scale), uniforms, c)


def softmax_balance_signs_incremental(K, V, uniforms, *, scale: float, c: float):
    """``B`` independent SoftmaxBalance walks on one set ``K (n, d)``, ``V (n, s)``, without the ``n x n`` Gram.

    Step ``j`` uses the kernel row ``kappa_{j, i<j} / R^2``, computed on the fly in chunks of 256 rows, and
    ``g = sum_{i<j} x_i kappa_ji / R^2`` for all ``B`` walks (rows of ``uniforms (B, n)``) at once, so
    ``n = 10^4`` costs ``O(n^2 (d + s + B))`` time and ``O(n B)`` memory. Same rule and same signs as
    :func:`softmax_balance_signs` on the broadcast problem: FAIL iff ``|g| > c``; a walk that fails
    gets sign 0 from its failing step on. Returns ``(signs (B, n) int8, failed_at (B,))``.
    """
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    if K.ndim != 2 or V.ndim != 2 or K.shape[0] != V.shape[0]:
        raise ValueError(f"K and V must have shapes (n, d) and (n, s) with equal n, got {K.shape} and {V.shape}")
    n = K.shape[0]
    r = np.asarray(uniforms, np.float64)
    if r.ndim != 2 or r.shape[1] != n or not np.all((r >= 0) & (r < 1)):
        raise ValueError(f"uniforms must have shape (B, {n}) with entries in [0, 1)")
    c = float(c)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    B = r.shape[0]
    kk = np.einsum("nd,nd->n", K, K)
    rk2 = float(kk.max()) if n else 0.0
    rv2 = float(np.max(np.einsum("ns,ns->n", V, V))) if n else 0.0
    rv2 = rv2 if rv2 > 0 else 1.0
    x = np.zeros((B, n), dtype=np.float64)
    failed_at = np.full(B, -1, dtype=np.int64)
    alive = np.ones(B, dtype=bool)
    chunk = 256  # kernel rows j0..j0+chunk are computed together (one matmul), then used one by one
    rows = np.empty((0, 0))
    for j in range(n):
        if j % chunk == 0:
            j1 = min(n, j + chunk)
            rows = K[j:j1] @ K[:j1].T
            rows -= rk2
            rows *= scale
            np.minimum(rows, 0.0, out=rows)
            np.exp(rows, out=rows)
            rows *= V[j:j1] @ V[:j1].T
            rows /= rv2
        if j:
            g = x[:, :j] @ rows[j % chunk, :j]
        else:
            g = np.zeros(B)
        fail = alive & (np.abs(g) > c)
        failed_at[fail] = j
        alive &= ~fail
        x[:, j] = np.where(alive, np.where(r[:, j] < 0.5 - g / (2 * c), 1.0, -1.0), 0.0)
    return x.astype(np.int8), failed_at


def kept_class(signs: np.ndarray) -> int:
    """The smaller sign class: ``+1`` if ``#(+1) <= #(-1)``, else ``-1`` (ties keep ``+1``)."""
    signs = np.asarray(signs)
    return 1 if np.count_nonzero(signs == 1) <= np.count_nonzero(signs == -1) else -1


def softmax_balance(
    K, V, uniforms, *, scale: float | None = None, c: float | None = None, delta: float = 0.01
) -> BalanceHalf:
    """One SoftmaxBalance halving of ``n`` tokens: keys ``(n, d)``, values ``(n, s)``, uniforms ``(n,)``.

    Returns the smaller sign class (at most ``n/2`` tokens, sorted indices) with log-weight
    ``log 2`` each. For values ``V = ones((n, 1))`` this is the denominator instance.
    ``scale`` defaults to ``1/sqrt(d)``; ``c`` to ``30 log(n/delta)``. Raises
    :class:`~balancekv.reference.walk.WalkFailure` if the walk fails.
    """
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    if K.ndim != 2 or V.ndim != 2 or K.shape[0] != V.shape[0]:
        raise ValueError(f"K and V must have shapes (n, d) and (n, s) with equal n, got {K.shape} and {V.shape}")
    if K.shape[0] == 0:
        raise ValueError("K is empty (n = 0)")
    scale = 1.0 / np.sqrt(K.shape[1]) if scale is None else float(scale)
    r = np.asarray(uniforms, np.float64).reshape(1, -1)
    signs, failed = softmax_balance_signs(K[None], V[None], r, scale=scale, c=c, delta=delta)
    if failed[0] >= 0:
        c_used = default_threshold(K.shape[0], delta) if c is None else float(c)
        G = normalized_softmax_gram(K[None], V[None], scale)[0]
        i = int(failed[0])
        g = float(G[i, :i] @ signs[0, :i].astype(np.float64))
        raise WalkFailure(i, g, c_used)
    x = signs[0]
    idx = np.flatnonzero(x == kept_class(x))
    return BalanceHalf(idx, np.full(idx.size, np.log(2.0)), x)
