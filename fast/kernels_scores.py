"""Triton kernels: the two-pass attention column-sum scorer of H2O / SnapKV (SPEC section 7).

Pass 1 (:func:`row_lse_kernel`): a flash-attention forward that keeps only the fp32
log-sum-exp of every causal query row. Pass 2 (:func:`col_sum_kernel`): one program
per (KV head, key block) recomputes ``Q K^T`` block by block for every query head of
the group and every query row that sees the block, normalises with the stored
log-sum-exp and sums columns in registers. Two launches and no atomics: the sums
are deterministic (the published single-launch kernel races on the column sums).
Queries sit at the end of the keys (query ``j`` at position ``L - Lq + j``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import interpreting

_INTERPRETED = interpreting()


@triton.jit
def row_lse_kernel(
    Q,
    K,
    LSE,
    Lq,
    L,
    d,
    scale,
    G,
    sq_h,
    sq_t,
    sk_h,
    sk_t,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    hq = tl.program_id(0)  # flattened query head
    pm = tl.program_id(1)
    hk = hq // G
    ft = tl.float64 if F64 else tl.float32
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cd = tl.arange(0, BLOCK_D)
    rok = rows < Lq
    q = tl.load(
        Q + hq * sq_h + rows[:, None] * sq_t + cd[None, :], mask=rok[:, None] & (cd[None, :] < d), other=0.0
    ).to(ft)
    qpos = L - Lq + rows
    m = tl.full((BLOCK_M,), float("-inf"), ft)
    ssum = tl.zeros((BLOCK_M,), ft)
    last = tl.minimum(L, L - Lq + (pm + 1) * BLOCK_M)
    for k0 in range(0, last, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        kt = tl.load(
            K + hk * sk_h + cols[None, :] * sk_t + cd[:, None], mask=(cols[None, :] < L) & (cd[:, None] < d), other=0.0
        ).to(ft)
        if F64:
            a = tl.dot(q, kt) * scale
        else:
            a = tl.dot(q, kt, input_precision="ieee") * scale
        live = rok[:, None] & (cols[None, :] <= qpos[:, None])
        a = tl.where(live, a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        ssum = ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(a - m_safe[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(ssum > 0, ssum, 1.0))  # padding rows: no log(0)
    tl.store(LSE + hq * Lq + rows, lse, mask=rok)


@triton.jit
def col_sum_kernel(
    Q,
    K,
    LSE,
    OUT,
    Lq,
    L,
    d,
    scale,
    G,
    sq_h,
    sq_t,
    sk_h,
    sk_t,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    hk = tl.program_id(0)
    pn = tl.program_id(1)
    ft = tl.float64 if F64 else tl.float32
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    cd = tl.arange(0, BLOCK_D)
    cok = cols < L
    kt = tl.load(
        K + hk * sk_h + cols[None, :] * sk_t + cd[:, None], mask=cok[None, :] & (cd[:, None] < d), other=0.0
    ).to(ft)
    acc = tl.zeros((BLOCK_N,), ft)
    # first query row that sees any key of this block: position >= pn * BLOCK_N
    first = tl.maximum(pn * BLOCK_N - (L - Lq), 0)
    first = (first // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        hq = hk * G + g
        for m0 in range(first, Lq, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rok = rows < Lq
            q = tl.load(
                Q + hq * sq_h + rows[:, None] * sq_t + cd[None, :], mask=rok[:, None] & (cd[None, :] < d), other=0.0
            ).to(ft)
            lse = tl.load(LSE + hq * Lq + rows, mask=rok, other=0.0)
            if F64:
                a = tl.dot(q, kt) * scale
            else:
                a = tl.dot(q, kt, input_precision="ieee") * scale
            live = rok[:, None] & cok[None, :] & (cols[None, :] <= (L - Lq + rows)[:, None])
            p = tl.where(live, tl.exp(a - lse[:, None]), 0.0)
            acc += tl.sum(p, axis=0)
    tl.store(OUT + hk * L + cols, acc, mask=cok)
