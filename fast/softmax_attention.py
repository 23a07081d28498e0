"""Torch implementations of exact attention and the weighted-token estimator.

Same semantics as :mod:`balancekv.reference.attention` (the definition); this
module only changes speed and device. Computation runs in float32 (float64 if
the inputs are float64) whatever the storage dtype, with the same max-shifted
exponentials as the reference.
"""

from __future__ import annotations

import math

import torch


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def causal_mask(m: int, n: int, device=None) -> torch.Tensor:
    """Query ``j`` of the last ``m`` positions sees keys ``0 .. n - m + j``."""
    return torch.arange(n, device=device)[None, :] <= (n - m + torch.arange(m, device=device))[:, None]


def _log_sum(a: torch.Tensor, v: torch.Tensor | None, both: bool = False):
    M = a.amax(dim=-1, keepdim=True)
    Msafe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    e = torch.exp(a - Msafe)
    if both:  # (max, e @ v, row sums of e)
        return M[..., 0], e @ v, e.sum(dim=-1, keepdim=True)
    S = e.sum(dim=-1, keepdim=True) if v is None else e @ v
    return M[..., 0], S


def weighted_attention(Q, K, V, num_logw, den_logw, scale=None, mask=None) -> torch.Tensor:
    """``z(q) = sum exp(a+num_logw) v / sum exp(a+den_logw)`` for every query; see the reference."""
    dt = compute_dtype(Q, K, V)
    Q, K, V = Q.to(dt), K.to(dt), V.to(dt)
    scale = 1.0 / math.sqrt(K.shape[-1]) if scale is None else float(scale)
    a = scale * (Q @ K.transpose(-1, -2))
    if mask is not None:
        a = a.masked_fill(~mask, float("-inf"))
    if num_logw is den_logw or (num_logw.shape == den_logw.shape and torch.equal(num_logw, den_logw)):
        # one weight set (SPEC 1, the consistent estimator): one exponential serves both sums (the same
        # numbers as two passes)
        Mn, Sn, Sd = _log_sum(a + num_logw.to(dt)[..., None, :], V, both=True)
        Md = Mn
    else:
        Mn, Sn = _log_sum(a + num_logw.to(dt)[..., None, :], V)
        Md, Sd = _log_sum(a + den_logw.to(dt)[..., None, :], None)
    if bool((~torch.isfinite(Md)).any()) or bool((Sd <= 0).any()):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    rel = torch.where(torch.isfinite(Mn), Mn - Md, torch.full_like(Mn, float("-inf")))
    out = torch.exp(rel)[..., None] * Sn / Sd
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("the estimate overflowed (numerator weights far exceed denominator weights)")
    return out


def attention(Q, K, V, scale=None, causal: bool = False) -> torch.Tensor:
    """Exact softmax attention (optionally causal, bottom-right aligned)."""
    zeros = torch.zeros(K.shape[:-1], dtype=compute_dtype(Q, K, V), device=K.device)
    mask = causal_mask(Q.shape[-2], K.shape[-2], K.device) if causal else None
    return weighted_attention(Q, K, V, zeros, zeros, scale, mask=mask)


def probe_softmax(K, probes, scale: float, shared: dict | None = None):
    """``(logits, weights)``, both ``(H, n, p)``: ``scale <k_i, q_l>`` and its softmax over the tokens, for every
    probe ``q_l (H, p, d)``. Several consumers read them (the exact attention of the probes, heavy-hitter scores,
    the query-aware kernel's logits, also of the folds: columns of these), so ``shared`` (a dict) keeps them
    for the call, keyed by the objects."""
    key = ("probe_softmax", id(probes), id(K), float(scale))
    hit = None if shared is None else shared.get(key)
    if hit is not None and hit[0] is probes and hit[1] is K:
        return hit[2]
    logits = float(scale) * (K @ probes.to(K.dtype).transpose(-1, -2))
    out = (logits, torch.softmax(logits, dim=-2))
    if shared is not None:
        shared[key] = (probes, K, out)
    return out
