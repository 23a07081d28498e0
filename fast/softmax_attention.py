"""Torch implementations of exact attention and the weighted-token estimator.

Same semantics as :mod:`balancekv.reference.attention` (the definition); this
module only changes speed and device. Computation runs in float32 (float64 if
the inputs are float64) whatever the storage dtype, with the same max-shifted
exponentials as the reference.
"""

from __future__ import annotations

import torch


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def weighted_attention(Q, K, V, num_logw, den_logw, scale=None, *, key_positions=None, query_positions=None):
    """``z(q) = sum exp(a+num_logw) v / sum exp(a+den_logw)`` for every query; see the reference.

    The package's one torch estimator computes it: :func:`.decode_attention.attend_parts` with the cache as one
    dense part (torch SDPA with the log-weights as a float bias for one weight set, two max-shifted log-sum-exps for
    two), in the compute dtype of ``Q``, ``K``, ``V``. ``key_positions`` / ``query_positions`` mask the slots of
    later tokens (as :func:`.decode_attention.attend_parts`; the reference's boolean ``mask`` is not taken here);
    ``FloatingPointError`` if a query has no slot."""
    from .decode_attention import attend_parts  # noqa: PLC0415  (it imports the quantization kernels)

    # the reference broadcasts the leading dims of every input (one head's log-weights (n,), a batch of query sets
    # against one cache, ...): broadcast them here too (views), so the cache is one dense part of those dims
    lead = torch.broadcast_shapes(Q.shape[:-2], K.shape[:-2], V.shape[:-2], num_logw.shape[:-1], den_logw.shape[:-1])
    Q, K, V = (x.expand(lead + tuple(x.shape[-2:])) for x in (Q, K, V))
    num_logw, den_logw = (x.expand(lead + tuple(x.shape[-1:])) for x in (num_logw, den_logw))
    return attend_parts(
        Q,
        [(K, V, num_logw, den_logw, key_positions)],
        scale,
        query_positions=query_positions,
        backend="torch",
        dtype=compute_dtype(Q, K, V),
    )


def attention(Q, K, V, scale=None, causal: bool = False) -> torch.Tensor:
    """Exact softmax attention (optionally causal, bottom-right aligned: query ``j`` of the last ``m`` positions
    sees keys ``0 .. n - m + j``)."""
    zeros = torch.zeros(K.shape[:-1], dtype=compute_dtype(Q, K, V), device=K.device)
    if not causal:
        return weighted_attention(Q, K, V, zeros, zeros, scale)
    n, m = K.shape[-2], Q.shape[-2]
    kp, qp = torch.arange(n, device=K.device), torch.arange(n - m, n, device=K.device)
    return weighted_attention(Q, K, V, zeros, zeros, scale, key_positions=kp, query_positions=qp)


def weighted_from_logits(a, V, num_logw, den_logw) -> torch.Tensor:
    """The estimator of :func:`weighted_attention` from its logits, ``(..., p, s)``: ``a (..., m, p)`` the scaled
    logits ``scale <k_i, q_j>`` slot by query (the layout of :func:`probe_softmax`), values ``V (..., m, s)``,
    log-weights ``(..., m)``; computed in ``a``'s dtype, each sum shifted by its own maximum. A caller that
    already holds the logits (the probes' over the working keys, shared by a ``compress`` call) skips the key
    product. Equal weight sets (the same tensor, or equal values): one softmax. ``FloatingPointError`` if a
    query has no slot in the denominator or the ratio of the two sets' maxima overflows."""
    dt = a.dtype
    Vd = V.to(dt)
    nl = num_logw.to(dt)
    an = a + nl.unsqueeze(-1)
    if den_logw is num_logw or (den_logw.shape == num_logw.shape and torch.equal(den_logw.to(dt), nl)):
        if not bool(torch.isfinite(an.amax(-2)).all()):
            raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
        return torch.softmax(an, dim=-2).transpose(-1, -2) @ Vd
    ad = a + den_logw.to(dt).unsqueeze(-1)
    mn, md = an.amax(-2, keepdim=True), ad.amax(-2, keepdim=True)
    if not bool(torch.isfinite(md).all()):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    fin = torch.isfinite(mn)
    mn_s = torch.where(fin, mn, torch.zeros_like(mn))
    sn = torch.exp(an - mn_s).transpose(-1, -2) @ Vd  # (..., p, s)
    sd = torch.exp(ad - md).sum(-2)  # (..., p)
    f = torch.exp(torch.where(fin, mn - md, torch.full_like(mn, float("-inf"))))[..., 0, :]
    if not bool(torch.isfinite(f).all()):
        raise FloatingPointError("overflow: the numerator's largest weight exceeds the denominator's beyond range")
    return (f / sd)[..., None] * sn


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
