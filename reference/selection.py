"""Token selection by attention scores and layer budgets [H2O, SNAP, SLLM, PYR, MINI] (SPEC section 7).

Definitions, NumPy float64, written for clarity:

- :func:`h2o_scores` — H2O's accumulated attention [H2O, arXiv 2306.14048, Sec. 3]:
  the column sums of the causal softmax attention matrix of the prompt,
  ``score_i = sum_j softmax_j(a_{j,:})_i`` over every query ``j`` that sees key ``i``;
  with grouped-query attention, summed over the query heads of a KV head.
- :func:`snapkv_scores` — SnapKV [SNAP, arXiv 2404.14469, Alg. 1]: the same
  column sums restricted to the last ``window`` queries (the observation
  window), then 1-D pooling (max or average, stride 1, same padding) over the
  positions before the window.
- :func:`streaming_indices` — StreamingLLM [SLLM]: the first ``sink`` and the last
  ``window`` positions.
- :func:`pyramid_budgets` — PyramidKV / MiniKV layer budgets [PYR, MINI].
- :func:`select_top` — keep the recent window plus the top-scoring earlier positions.

Query-head convention for GQA (``group > 1``): query head ``h`` belongs to KV head
``h // group`` (HuggingFace ``repeat_kv`` order). Queries are aligned to the
*end* of the keys: with ``Lq <= L`` queries, query ``j`` sits at position
``L - Lq + j`` and sees keys ``0 .. L - Lq + j`` (causal, bottom-right aligned).
"""

from __future__ import annotations

import numpy as np

from .softmax_attention import causal_mask, default_scale, logits

POOLS = ("max", "avg")


def _check_qk(Q, K, group):
    Q, K = np.asarray(Q, np.float64), np.asarray(K, np.float64)
    if Q.ndim < 3 or K.ndim < 3:
        raise ValueError(f"Q and K must have shape (..., heads, tokens, d), got {Q.shape} and {K.shape}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if Q.shape[:-3] != K.shape[:-3] or Q.shape[-3] != K.shape[-3] * group:
        raise ValueError(f"Q heads {Q.shape[:-2]} must be K heads {K.shape[:-2]} times group={group}")
    if Q.shape[-1] != K.shape[-1]:
        raise ValueError(f"Q and K must have the same d, got {Q.shape[-1]} and {K.shape[-1]}")
    if Q.shape[-2] > K.shape[-2] or Q.shape[-2] == 0:
        raise ValueError(f"Q must hold between 1 and L={K.shape[-2]} queries, got {Q.shape[-2]}")
    return Q, K


def _causal_probs(Q, K, scale, group, rows=None):
    """``P (..., Hkv, group, r, L)``: causal softmax rows of each query head, grouped by KV head.

    ``rows = (j0, j1)`` restricts to queries ``j0 .. j1 - 1`` of the ``Lq`` (default: all).
    """
    Hkv, L, d = K.shape[-3:]
    Lq = Q.shape[-2]
    j0, j1 = rows if rows is not None else (0, Lq)
    Qg = Q[..., j0:j1, :].reshape(Q.shape[:-3] + (Hkv, group, j1 - j0, d))
    a = logits(Qg, K[..., None, :, :], default_scale(d, scale))
    a = np.where(causal_mask(Lq, L)[j0:j1], a, -np.inf)
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def h2o_scores(Q, K, scale=None, group: int = 1, block: int = 256) -> np.ndarray:
    """H2O heavy-hitter scores ``(..., Hkv, L)`` for ``Q (..., Hkv*group, Lq, d)``, ``K (..., Hkv, L, d)``.

    ``score[h, i] = sum over query heads g of KV head h, and over queries j,
    of softmax(scale * q_j K^T, causal)[i]``. With ``Lq = L`` (all prompt queries)
    this is H2O's accumulated attention; each row sums to 1, so the scores of one
    KV head sum to ``group * Lq``. Rows are summed ``block`` queries at a time: memory
    ``O(block * L)`` per head, never an ``Lq x L`` matrix (issue 15, item 5).
    """
    Q, K = _check_qk(Q, K, group)
    Lq = Q.shape[-2]
    out = np.zeros(K.shape[:-1])
    for j0 in range(0, Lq, int(block)):
        out += _causal_probs(Q, K, scale, group, (j0, min(Lq, j0 + int(block)))).sum(axis=(-3, -2))
    return out


def _pool_same(x, kernel: int, pool: str):
    """1-D pooling along the last axis, stride 1, padding ``kernel // 2`` on both sides.

    ``max`` ignores the padding (pads with ``-inf``); ``avg`` divides by ``kernel``
    (zero padding counted, as ``torch.nn.functional.avg_pool1d`` does by default,
    which SnapKV's code uses). An even ``kernel`` would change the length, so it is refused.
    """
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd for same-length pooling, got {kernel}")
    p = kernel // 2
    L = x.shape[-1]
    pad = np.full(x.shape[:-1] + (p,), -np.inf if pool == "max" else 0.0)
    xp = np.concatenate([pad, x, pad], axis=-1)
    win = np.stack([xp[..., t : t + L] for t in range(kernel)], axis=-1)
    return win.max(axis=-1) if pool == "max" else win.sum(axis=-1) / kernel


def snapkv_scores(Q, K, scale=None, window: int = 32, kernel: int = 7, pool: str = "max", group: int = 1) -> np.ndarray:
    """SnapKV scores ``(..., Hkv, L)``.

    The observation window is the last ``w = min(window, Lq)`` queries of ``Q``
    (positions ``L - w .. L - 1``, causal inside the window). For a prefix position
    ``i < L - w``: ``score_i = pool_k( sum_{group heads, window queries j} softmax(a_j)[:L-w] )_i``,
    the softmax taken over the full causal row, the pooling over the prefix columns only
    (as SnapKV's ``attn_weights[..., -w:, :-w].sum(-2)`` then ``pool1d``). The window
    positions themselves are always kept and score ``+inf``.
    """
    Q, K = _check_qk(Q, K, group)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    for name, v in (("window", window), ("kernel", kernel)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    L = K.shape[-2]
    w = min(int(window), Q.shape[-2])
    P = _causal_probs(Q[..., -w:, :], K, scale, group)
    col = P.sum(axis=(-3, -2))  # (..., Hkv, L)
    out = np.full(col.shape, np.inf)
    if L > w:
        out[..., : L - w] = _pool_same(col[..., : L - w], int(kernel), pool)
    return out


def streaming_indices(L: int, sink: int, window: int) -> np.ndarray:
    """StreamingLLM [SLLM]: the sorted positions ``0..sink-1`` and ``L-window..L-1`` (deduplicated)."""
    if sink < 0 or window < 0:
        raise ValueError(f"sink and window must be >= 0, got {sink} and {window}")
    return np.union1d(np.arange(min(sink, L)), np.arange(max(0, L - window), L)).astype(np.int64)


def select_top(scores, budget: int, recent: int) -> np.ndarray:
    """Sorted indices ``(..., budget)``: the last ``recent`` positions plus the top ``budget - recent`` earlier ones.

    Among positions ``0 .. L - recent - 1`` the kept ones are exactly those with the
    largest scores; ties are broken towards the earlier position (stable order), so the
    result is deterministic.
    """
    sc = np.asarray(scores, np.float64)
    L = sc.shape[-1]
    for name, v in (("budget", budget), ("recent", recent)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= recent <= budget <= L:
        raise ValueError(f"need 0 <= recent <= budget <= L={L}, got recent={recent}, budget={budget}")
    if np.isnan(sc).any():
        raise ValueError("scores contain NaN")
    heavy = budget - recent
    prefix = sc[..., : L - recent]
    order = np.argsort(-prefix, axis=-1, kind="stable")[..., :heavy]
    rec = np.broadcast_to(np.arange(L - recent, L), sc.shape[:-1] + (recent,))
    return np.sort(np.concatenate([order, rec], axis=-1), axis=-1).astype(np.int64)


def pyramid_budgets(mean_ratio: float, layers: int, beta: float) -> np.ndarray:
    """Per-layer kept ratios ``(layers,)``: linear from ``h_0 = 2h - h/beta`` down to ``h_{L-1} = h/beta``.

    [PYR, MINI]: the arithmetic mean of the unclipped ratios is exactly ``h``
    (``(h_0 + h_{L-1}) / 2 = h``). Ratios are clipped to ``[0, 1]``; clipping happens only
    when ``h_0 > 1``, i.e. ``h > 1 / (2 - 1/beta)``, and then lowers the mean below ``h``.
    ``beta >= 1``; ``beta = 1`` gives the uniform budget. One layer gets ``h``.
    MiniKV uses ``beta = 7``; PyramidKV ``beta = 20`` (applied to the budget beyond the window).
    """
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    if not (isinstance(mean_ratio, (int, float, np.floating, np.integer)) and 0 <= mean_ratio <= 1):
        raise ValueError(f"mean_ratio must lie in [0, 1], got {mean_ratio!r}")
    if not (isinstance(beta, (int, float, np.floating, np.integer)) and np.isfinite(beta) and beta >= 1):
        raise ValueError(f"beta must be a finite number >= 1, got {beta!r}")
    h = float(mean_ratio)
    if layers == 1:
        return np.array([h])
    last = h / beta
    first = 2 * h - last
    ratios = first + (last - first) * np.arange(layers) / (layers - 1)
    return np.clip(ratios, 0.0, 1.0)
