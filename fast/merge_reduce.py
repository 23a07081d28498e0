"""MergeAndReduce [BKV, Alg. 1] in torch: the theory-faithful streaming instance on the caller's device.

Same semantics as :class:`balancekv.reference.merge_reduce.MergeAndReduce` (the definition,
SPEC 4a): an exact level-0 buffer of ``t`` tokens, a binary counter of reduced sets, each
merge halved by SoftmaxBalance (the [ALS] walk on the normalised softmax Gram matrix,
:func:`balancekv.fast.walk.gram_walk_signs`), the smaller sign class kept with its weight
doubled, FAILs retried with fresh uniforms and then kept exactly. Every array is a torch
tensor; the only host data are the uniforms, drawn from the same generator in the same
order as the reference (``rng.random((1, |merged|))`` per try), so a float64 instance keeps
the same tokens with the same weights as the reference (up to genuine ties of the walk).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .walk import gram_walk_signs

__all__ = ["MergeAndReduceTorch", "normalized_softmax_gram", "pow2_unit", "scaled_norms"]


def scaled_norms(X: torch.Tensor) -> torch.Tensor:
    """``||x||_2`` over the last axis without overflow (``m * ||x / m||`` with ``m = max |x|``)."""
    m = X.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return (safe * torch.linalg.vector_norm(X / safe, dim=-1, keepdim=True))[..., 0] * (m[..., 0] > 0)


def pow2_unit(X: torch.Tensor) -> float:
    """A power of two ``u`` with ``max |X| / u <= 1`` when ``max |X| > 2^400`` (else 1): dividing by it is
    exact, so squared norms of ``X / u`` cannot overflow and the walk's Gram matrix is unchanged."""
    m = float(X.abs().max()) if X.numel() else 0.0
    return 2.0 ** math.ceil(math.log2(m)) if m > 2.0**400 else 1.0


def normalized_softmax_gram(K: torch.Tensor, V: torch.Tensor, scale: float) -> torch.Tensor:
    """``kappa_ij / R^2`` of :func:`balancekv.reference.softmax_balance.normalized_softmax_gram` in torch
    (the same formula: ``exp(min(scale (<k_i,k_j> - r_k^2), 0)) <v_i,v_j> / r_v^2``)."""
    rk2 = (K * K).sum(-1).amax(-1)
    expo = (scale * (K @ K.transpose(-1, -2) - rk2[:, None, None])).clamp(max=0.0)
    rv2 = (V * V).sum(-1).amax(-1)
    safe = torch.where(rv2 > 0, rv2, torch.ones_like(rv2))
    return torch.exp(expo) * (V @ V.transpose(-1, -2)) / safe[:, None, None]


def default_threshold(n: int, delta: float) -> float:
    from balancekv.reference.walk import default_threshold as ref  # noqa: PLC0415  (the one definition)

    return ref(n, delta)


class MergeAndReduceTorch:
    """One MergeAndReduce instance over ``d``-dim keys and ``s``-dim values, in torch.

    Parameters as :class:`balancekv.reference.merge_reduce.MergeAndReduce`; ``dtype`` and
    ``device`` of the tensors it holds. Tokens are fed one by one (``add``) or in order
    (``extend``); the buffer is a preallocated ``(t, ·)`` tensor written in place.
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
        dtype=torch.float32,
        device=None,
        backend: str = "auto",
    ):
        if int(t) < 1:
            raise ValueError(f"t must be >= 1, got {t}")
        self.t, self.d, self.s = int(t), int(d), int(s)
        self.scale, self.rng, self.c, self.delta = float(scale), rng, c, float(delta)
        self.max_retries = int(max_retries)
        self.dtype, self.device, self.backend = dtype, device, backend
        self.buf_k = torch.zeros((self.t, d), dtype=dtype, device=device)
        self.buf_v = torch.zeros((self.t, s), dtype=dtype, device=device)
        self.buf_pos = torch.full((self.t,), -1, dtype=torch.int64, device=device)
        self.nbuf = 0
        self.levels: list[tuple | None] = []
        self.n_seen = 0
        self.reductions = 0
        self.retries = 0
        self.fallbacks = 0

    def add(self, k: torch.Tensor, v: torch.Tensor, pos) -> None:
        self.buf_k[self.nbuf] = k
        self.buf_v[self.nbuf] = v
        self.buf_pos[self.nbuf] = pos
        self.nbuf += 1
        self.n_seen += 1
        if self.nbuf == self.t:
            z = torch.zeros(self.t, dtype=self.dtype, device=self.device)
            block = (self.buf_k.clone(), self.buf_v.clone(), self.buf_pos.clone(), z)
            self.nbuf = 0
            self._push(block, 0)

    def extend(self, K, V, positions) -> None:
        for j in range(K.shape[0]):
            self.add(K[j], V[j], positions[j])

    def _push(self, block: tuple, level: int) -> None:
        while True:
            while len(self.levels) <= level:
                self.levels.append(None)
            if self.levels[level] is None:
                self.levels[level] = block
                return
            other = self.levels[level]
            self.levels[level] = None
            merged = tuple(torch.cat([a, b], dim=0) for a, b in zip(other, block))
            block = self.reduce(merged)
            level += 1

    def reduce(self, merged: tuple) -> tuple:
        K, V, pos, logw = merged
        n = K.shape[0]
        self.reductions += 1
        if n <= 1:
            return merged
        Vw = V * torch.exp(logw)[:, None]
        Vw = Vw / pow2_unit(Vw)  # exact rescaling: value norms near 1e154 do not overflow the Gram matrix
        c = default_threshold(n, self.delta) if self.c is None else self.c
        G = normalized_softmax_gram(K[None], Vw[None], self.scale)
        for attempt in range(self.max_retries + 1):
            self.retries += attempt > 0
            r = torch.from_numpy(self.rng.random((1, n))).to(device=K.device, dtype=K.dtype)
            signs, failed = gram_walk_signs(G, r, c, backend=self.backend)
            if int(failed[0]) < 0:
                x = signs[0]
                cls = 1 if int((x == 1).sum()) <= int((x == -1).sum()) else -1
                keep = x == cls
                if bool(keep.any()):
                    return K[keep], V[keep], pos[keep], logw[keep] + math.log(2.0)
        self.fallbacks += 1
        return merged

    def contents(self):
        """``(K (m, d), V (m, s), positions (m,), log_weights (m,))`` of every stored token."""
        parts = [x for x in self.levels if x is not None]
        if self.nbuf:
            z = torch.zeros(self.nbuf, dtype=self.dtype, device=self.device)
            parts.append((self.buf_k[: self.nbuf], self.buf_v[: self.nbuf], self.buf_pos[: self.nbuf], z))
        if not parts:
            e = lambda *shape, dt=self.dtype: torch.zeros(shape, dtype=dt, device=self.device)
            return e(0, self.d), e(0, self.s), e(0, dt=torch.int64), e(0)
        return tuple(torch.cat([p[i] for p in parts], dim=0) for i in range(4))

    @property
    def size(self) -> int:
        return self.nbuf + sum(x[0].shape[0] for x in self.levels if x is not None)
