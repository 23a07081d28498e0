"""The self-balancing walk of Alweiss, Liu and Sawhney [ALS, arXiv 2006.14009] (SPEC section 2).

Given vectors ``u_1 .. u_n`` with ``||u_i||_2 <= 1`` and a threshold ``c``::

    w = 0
    for i = 1 .. n:
        g = <w, u_i>
        if |g| > c: FAIL
        x_i = +1 if r_i < 1/2 - g / (2c) else -1      (r_i ~ U[0, 1) given as input)
        w = w + x_i u_i

The walk drifts back towards the origin in every direction it is pushed, so
the signed sum ``w_n = sum_i x_i u_i`` stays ``O(sqrt(c))``-subgaussian in
every direction (independent of ``n`` and of the dimension), while independent
random signs give ``sqrt(n)`` (see ``proofs/self_balancing_walk.md`` and
:func:`balancekv.bounds.walk.als_direction_bound`).

Threshold convention. [ALS] take ``c = 30 log(n T / delta)`` where the union
bound runs over ``T`` steps *and* the ``n`` coordinates of the ell_infinity
discrepancy they bound. We bound the walk in a fixed direction and the failure
event only, whose union bound runs over the ``n`` steps, so we use
``c = 30 log(n / delta)`` (natural log, ``n`` = number of vectors); ``c`` is a
parameter everywhere.

Randomness enters only through the uniforms, so any two implementations fed the
same uniforms produce the same signs (SPEC section 11).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "WalkFailure",
    "default_threshold",
    "gram_walk_signs",
    "self_balancing_walk",
    "self_balancing_walk_batch",
]

#: tolerance on ``||u_i|| <= 1`` for the vector form (rounding of normalised inputs)
NORM_TOL = 1e-9


class WalkFailure(RuntimeError):
    """The walk met ``|<w, u_i>| > c`` at step ``step`` (0-based); ``g`` is that inner product."""

    def __init__(self, step: int, g: float, c: float):
        super().__init__(f"self-balancing walk failed at step {step}: |g| = {abs(g):.4g} > c = {c:.4g}")
        self.step, self.g, self.c = int(step), float(g), float(c)


def default_threshold(n: int, delta: float = 0.01) -> float:
    """``c = 30 * log(n / delta)`` (natural log; see the module docstring for the convention).

    For ``n / delta <= e`` the formula is below 30; we never go below ``30`` so that
    tiny inputs keep a meaningful threshold.
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 30.0 * max(1.0, float(np.log(n / delta)))


def _check_uniforms(uniforms: np.ndarray, shape: tuple) -> np.ndarray:
    r = np.asarray(uniforms, dtype=np.float64)
    if r.shape != shape:
        raise ValueError(f"uniforms must have shape {shape}, got {r.shape}")
    if not np.all((r >= 0) & (r < 1)):
        raise ValueError("uniforms must lie in [0, 1)")
    return r


def self_balancing_walk(vectors, uniforms, c: float | None = None, delta: float = 0.01) -> np.ndarray:
    """Signs ``x (n,)`` in ``{-1, +1}`` (int8) of the [ALS] walk on ``vectors (n, D)``.

    ``uniforms (n,)`` in ``[0, 1)``: ``x_i = +1`` iff ``r_i < 1/2 - g_i / (2c)`` with
    ``g_i = <sum_{j<i} x_j u_j, u_i>``. ``c`` defaults to :func:`default_threshold`
    ``(n, delta)``. Raises :class:`WalkFailure` (with ``.step``) the first time
    ``|g_i| > c``, and ``ValueError`` if some ``||u_i|| > 1``.
    """
    U = np.asarray(vectors, dtype=np.float64)
    if U.ndim != 2:
        raise ValueError(f"vectors must have shape (n, D), got {U.shape}")
    if not np.all(np.isfinite(U)):
        raise ValueError("vectors contain NaN or Inf")
    n = U.shape[0]
    r = _check_uniforms(uniforms, (n,))
    if np.any(np.linalg.norm(U, axis=1) > 1 + NORM_TOL):
        raise ValueError("vectors must have ||u_i||_2 <= 1 (normalise them first)")
    c = default_threshold(max(n, 1), delta) if c is None else float(c)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    w = np.zeros(U.shape[1])
    x = np.empty(n, dtype=np.int8)
    for i in range(n):
        g = float(w @ U[i])
        if abs(g) > c:
            raise WalkFailure(i, g, c)
        x[i] = 1 if r[i] < 0.5 - g / (2 * c) else -1
        w += x[i] * U[i]
    return x


def gram_walk_signs(G, uniforms, c):
    """The [ALS] walk on ``B`` independent problems given only their Gram matrices.

    Parameters
    ----------
    G : ``(B, n, n)`` with ``G[b, i, j] = <u_i, u_j>`` of problem ``b`` (only ``j < i`` is read).
    uniforms : ``(B, n)`` in ``[0, 1)``.
    c : threshold, a scalar or a ``(B,)`` array.

    Returns
    -------
    signs : ``(B, n)`` int8. Step ``i`` of problem ``b``: ``g = sum_{j<i} G[b,i,j] x_j``;
        FAIL iff ``|g| > c``; otherwise ``x_i = +1`` iff ``r_i < 1/2 - g/(2c)``, else ``-1``.
        A problem that fails at step ``i`` gets sign 0 at ``i`` and every later step.
    failed_at : ``(B,)`` int64, the failing step, ``-1`` if the problem did not fail.
    """
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"G must have shape (B, n, n), got {G.shape}")
    B, n, _ = G.shape
    r = _check_uniforms(uniforms, (B, n))
    cc = np.broadcast_to(np.asarray(c, dtype=np.float64), (B,)).copy()
    if not np.all(cc > 0):
        raise ValueError("c must be > 0")
    x = np.zeros((B, n), dtype=np.float64)
    failed_at = np.full(B, -1, dtype=np.int64)
    alive = np.ones(B, dtype=bool)
    for i in range(n):
        g = np.einsum("bj,bj->b", G[:, i, :i], x[:, :i])
        fail = alive & (np.abs(g) > cc)
        failed_at[fail] = i
        alive &= ~fail
        xi = np.where(r[:, i] < 0.5 - g / (2 * cc), 1.0, -1.0)
        x[:, i] = np.where(alive, xi, 0.0)
    return x.astype(np.int8), failed_at


def self_balancing_walk_batch(vectors, uniforms, c):
    """``B`` independent [ALS] walks on the same ``vectors (n, D)``, one per row of ``uniforms (B, n)``.

    The rule is :func:`self_balancing_walk`'s, run for all walks at once (one NumPy step per
    vector, so ``n = 10^5`` in small ``D`` takes about a second for any ``B`` up to a few
    hundred). A walk does not stop at a FAIL here: ``failed_at[b]`` records its first step with
    ``|g| > c`` (``-1``: none) and its later signs are still drawn with the clipped rule
    ``x = +1`` iff ``r < 1/2 - g/(2c)`` (the probability leaves ``[0, 1]`` only after a FAIL), so
    callers see both the FAIL and what the signs would have done.

    Returns ``(signs (B, n) int8, failed_at (B,) int64, end (B, D))``, ``end = sum_i x_i u_i``.
    """
    U = np.asarray(vectors, dtype=np.float64)
    if U.ndim != 2:
        raise ValueError(f"vectors must have shape (n, D), got {U.shape}")
    if not np.all(np.isfinite(U)):
        raise ValueError("vectors contain NaN or Inf")
    n, D = U.shape
    r = np.asarray(uniforms, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != n:
        raise ValueError(f"uniforms must have shape (B, {n}), got {r.shape}")
    r = _check_uniforms(r, r.shape)
    if np.any(np.linalg.norm(U, axis=1) > 1 + NORM_TOL):
        raise ValueError("vectors must have ||u_i||_2 <= 1 (normalise them first)")
    c = float(c)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    B = r.shape[0]
    w = np.zeros((B, D))
    x = np.empty((B, n), dtype=np.int8)
    failed_at = np.full(B, -1, dtype=np.int64)
    rt = np.ascontiguousarray(r.T)
    for i in range(n):
        u = U[i]
        g = w @ u
        bad = (np.abs(g) > c) & (failed_at < 0)
        if bad.any():
            failed_at[bad] = i
        xi = np.where(rt[i] < 0.5 - g / (2 * c), 1, -1)
        x[:, i] = xi
        w += xi[:, None] * u
    return x, failed_at, w
