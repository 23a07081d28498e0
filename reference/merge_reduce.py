"""MergeAndReduce: the streaming skeleton of BalanceKV [BKV, Alg. 1, Thm 3.1 / 3.4] (SPEC 4a).

One instance compresses one stream of weighted tokens ``(k, v)``:

- new tokens enter an exact level-0 buffer; when it holds ``t`` tokens it becomes
  a *set* pushed to level 0;
- level ``l`` holds at most one set; pushing a set onto an occupied level merges
  the two (at most ``2t`` tokens), halves the union with
  :func:`~balancekv.reference.softmax_balance.softmax_balance` (smaller sign
  class, weights doubled) and pushes the result to level ``l + 1``.

This is a binary counter: after ``n`` tokens level ``l`` is occupied iff bit ``l``
of ``floor(n/t)`` is 1, every set holds at most ``t`` tokens of weight ``2^l``, and
the memory is at most ``t * (2 + floor(log2(n/t)))`` tokens
(:func:`balancekv.bounds.balance.merge_reduce_memory_bound`).

The walk balances the *weighted* values ``w_i v_i`` (all weights of a set are equal
unless a fallback happened, so this is the paper's walk on ``v``). FAIL handling
(SPEC section 2): a failed walk, or one whose signs are all equal (empty smaller
class, probability ``2^(1-|merged|)`` for coin-like walks), is retried with fresh uniforms up to ``max_retries``
times; if every try fails the merged set is kept exactly (weights unchanged) and
pushed up, and the event is counted in ``fallbacks``. Nothing is dropped.
"""

from __future__ import annotations

import math

import numpy as np

from .softmax_balance import kept_class, softmax_balance_signs
from .walk import default_threshold

__all__ = ["MergeAndReduce", "pow2_unit"]


def pow2_unit(X) -> float:
    """A power of two ``u`` with ``max |X| / u <= 1`` when ``max |X| > 2^400`` (else 1). Dividing by it is
    exact, so squared norms of ``X / u`` cannot overflow, and scale-invariant quantities (the walk's
    normalised Gram matrix, l2-sampling probabilities) are bit-identical to the unscaled ones."""
    m = float(np.max(np.abs(X))) if np.size(X) else 0.0
    return 2.0 ** math.ceil(math.log2(m)) if m > 2.0**400 else 1.0


class MergeAndReduce:
    """One MergeAndReduce instance over ``d``-dim keys and ``s``-dim values.

    Parameters
    ----------
    t : batch size (buffer capacity and nominal set size), ``>= 1``.
    scale : logit scale of the softmax kernel.
    rng : the generator the walks draw their uniforms from (``rng.random(size)``).
    c : walk threshold, default ``30 log(|merged| / delta)`` per reduction.
    delta : failure probability used by the default threshold.
    max_retries : fresh-randomness retries of a failed walk before the exact fallback.
    """

    def __init__(
        self,
        t: int,
        d: int,
        s: int,
        *,
        scale: float,
        rng: np.random.Generator,
        c: float | None = None,
        delta: float = 0.01,
        max_retries: int = 3,
    ):
        if int(t) < 1:
            raise ValueError(f"t must be >= 1, got {t}")
        self.t, self.d, self.s = int(t), int(d), int(s)
        self.scale, self.rng, self.c, self.delta = float(scale), rng, c, float(delta)
        self.max_retries = int(max_retries)
        self.buf_k: list[np.ndarray] = []
        self.buf_v: list[np.ndarray] = []
        self.buf_pos: list[int] = []
        self.levels: list[tuple | None] = []  # (K, V, pos, logw) or None
        self.n_seen = 0
        self.reductions = 0
        self.retries = 0
        self.fallbacks = 0

    # ------------------------------------------------------------------ updates
    def add(self, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        """Feed one token (copied)."""
        self.buf_k.append(np.array(k, np.float64))
        self.buf_v.append(np.array(v, np.float64))
        self.buf_pos.append(int(pos))
        self.n_seen += 1
        if len(self.buf_pos) == self.t:
            block = (np.stack(self.buf_k), np.stack(self.buf_v), np.asarray(self.buf_pos, np.int64), np.zeros(self.t))
            self.buf_k, self.buf_v, self.buf_pos = [], [], []
            self._push(block, 0)

    def extend(self, K: np.ndarray, V: np.ndarray, positions) -> None:
        """Feed tokens ``K (m, d)``, ``V (m, s)`` one by one, in order."""
        for k, v, p in zip(K, V, positions):
            self.add(k, v, p)

    def _push(self, block: tuple, level: int) -> None:
        while True:
            while len(self.levels) <= level:
                self.levels.append(None)
            if self.levels[level] is None:
                self.levels[level] = block
                return
            other = self.levels[level]
            self.levels[level] = None
            merged = tuple(np.concatenate([a, b], axis=0) for a, b in zip(other, block))
            block = self.reduce(merged)
            level += 1

    def reduce(self, merged: tuple) -> tuple:
        """SoftmaxBalance halving of a merged set, with retries and the exact fallback."""
        K, V, pos, logw = merged
        n = K.shape[0]
        self.reductions += 1
        if n <= 1:  # nothing to halve
            return merged
        Vw = V * np.exp(logw)[:, None]
        Vw = Vw / pow2_unit(Vw)  # exact rescaling: value norms near 1e154 do not overflow the Gram matrix
        c = default_threshold(n, self.delta) if self.c is None else self.c
        for attempt in range(self.max_retries + 1):
            self.retries += attempt > 0  # a retry: fresh uniforms after a FAIL
            r = self.rng.random((1, n))
            signs, failed = softmax_balance_signs(K[None], Vw[None], r, scale=self.scale, c=c)
            if failed[0] < 0:
                keep = signs[0] == kept_class(signs[0])
                if keep.any():
                    return K[keep], V[keep], pos[keep], logw[keep] + np.log(2.0)
                # all signs equal: the smaller class is empty; treated like a FAIL (retry), so that
                # no instance ever loses all its mass (an empty denominator leaves z undefined)
        self.fallbacks += 1
        return merged

    # ------------------------------------------------------------------ contents
    def contents(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(K (m, d), V (m, s), positions (m,), log_weights (m,))`` of every stored token."""
        parts = [x for x in self.levels if x is not None]
        if self.buf_pos:
            parts.append(
                (
                    np.stack(self.buf_k),
                    np.stack(self.buf_v),
                    np.asarray(self.buf_pos, np.int64),
                    np.zeros(len(self.buf_pos)),
                )
            )
        if not parts:
            return np.zeros((0, self.d)), np.zeros((0, self.s)), np.zeros(0, np.int64), np.zeros(0)
        return tuple(np.concatenate([p[i] for p in parts], axis=0) for i in range(4))

    @property
    def size(self) -> int:
        """Tokens stored now (sets plus buffer)."""
        return len(self.buf_pos) + sum(x[0].shape[0] for x in self.levels if x is not None)
