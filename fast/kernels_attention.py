"""Triton kernel: split-K decode attention over a weighted (and possibly low-bit) token set.

One program per (KV head, split of the token axis) computes, for every query row
of that KV head (all query heads of its GQA group times the decode queries), the
partial sums of the estimator of SPEC section 1 over its tokens::

    MN = max_i (a_i + num_logw_i),  SN = sum_i exp(a_i + num_logw_i - MN) v_i
    MD = max_i (a_i + den_logw_i),  SD = sum_i exp(a_i + den_logw_i - MD)

(flash-decoding: the token axis is split so that a long cache fills the GPU even
with one query). The host combines the splits of every segment with the same
max-shift rule. Keys may be packed low-bit codes along the token axis (KIVI
per-channel layout) and values packed along the channel axis (per-token layout);
they are dequantized in registers (``code * scale + zero``), never written out.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import interpreting

_INTERPRETED = interpreting()


@triton.jit
def decode_split_kernel(
    Q,
    K,
    KS,
    KZ,
    V,
    VS,
    VZ,
    NL,
    DL,
    KPOS,
    QPOS,
    MN,
    MD,
    SN,
    SD,
    n,
    R,
    d,
    s,
    tokens_per_split,
    num_splits,
    scale,
    koff,
    sq_b,
    sq_r,
    sq_c,
    sk_b,
    sk_t,
    sk_c,
    sks_b,
    sks_t,
    sks_c,
    sv_b,
    sv_t,
    sv_c,
    svs_b,
    svs_t,
    svs_c,
    KB: tl.constexpr,
    KG: tl.constexpr,
    VB: tl.constexpr,
    VG: tl.constexpr,
    HAS_POS: tl.constexpr,
    LOW_PREC_DOT: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    acc_t = tl.float64 if F64 else tl.float32
    NEG_INF = float("-inf")

    rows = tl.arange(0, BLOCK_R)
    cd = tl.arange(0, BLOCK_D)
    cs = tl.arange(0, BLOCK_S)
    row_ok = rows < R
    q = tl.load(
        Q + b * sq_b + rows[:, None] * sq_r + cd[None, :] * sq_c, mask=row_ok[:, None] & (cd[None, :] < d), other=0.0
    ).to(acc_t)
    if HAS_POS:
        qpos = tl.load(QPOS + b * R + rows, mask=row_ok, other=0)

    mn = tl.full((BLOCK_R,), NEG_INF, acc_t)
    md = tl.full((BLOCK_R,), NEG_INF, acc_t)
    sn = tl.zeros((BLOCK_R, BLOCK_S), acc_t)
    sd = tl.zeros((BLOCK_R,), acc_t)

    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, n)
    for t0 in range(start, stop, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < stop
        # ---- keys, as a (BLOCK_D, BLOCK_N) tile of floats
        kmask = (cd[:, None] < d) & t_ok[None, :]
        if KB == 0:
            kt = tl.load(K + b * sk_b + t[None, :] * sk_t + cd[:, None] * sk_c, mask=kmask, other=0.0).to(acc_t)
        else:
            PK: tl.constexpr = 32 // KB
            tk = t + koff  # token index inside the packed store (a part may start mid-store)
            w = tl.load(K + b * sk_b + (tk[None, :] // PK) * sk_t + cd[:, None] * sk_c, mask=kmask, other=0)
            code = (w >> ((tk[None, :] % PK) * KB)) & ((1 << KB) - 1)
            soff = b * sks_b + (tk[None, :] // KG) * sks_t + cd[:, None] * sks_c
            ksc = tl.load(KS + soff, mask=kmask, other=0.0).to(acc_t)
            kze = tl.load(KZ + soff, mask=kmask, other=0.0).to(acc_t)
            kt = code.to(acc_t) * ksc + kze
        # ---- values, as a (BLOCK_N, BLOCK_S) tile
        vmask = t_ok[:, None] & (cs[None, :] < s)
        if VB == 0:
            vt = tl.load(V + b * sv_b + t[:, None] * sv_t + cs[None, :] * sv_c, mask=vmask, other=0.0).to(acc_t)
        else:
            PV: tl.constexpr = 32 // VB
            w = tl.load(V + b * sv_b + t[:, None] * sv_t + (cs[None, :] // PV) * sv_c, mask=vmask, other=0)
            code = (w >> ((cs[None, :] % PV) * VB)) & ((1 << VB) - 1)
            soff = b * svs_b + t[:, None] * svs_t + (cs[None, :] // VG) * svs_c
            vsc = tl.load(VS + soff, mask=vmask, other=0.0).to(acc_t)
            vze = tl.load(VZ + soff, mask=vmask, other=0.0).to(acc_t)
            vt = code.to(acc_t) * vsc + vze
        # ---- logits (BLOCK_R, BLOCK_N)
        if LOW_PREC_DOT == 1:
            a = tl.dot(q.to(tl.float16), kt.to(tl.float16)).to(acc_t) * scale
        elif LOW_PREC_DOT == 2:
            a = tl.dot(q.to(tl.bfloat16), kt.to(tl.bfloat16)).to(acc_t) * scale
        elif F64:
            a = tl.dot(q, kt) * scale
        else:
            a = tl.dot(q, kt, input_precision="ieee") * scale
        nl = tl.load(NL + b * n + t, mask=t_ok, other=NEG_INF).to(acc_t)
        dl = tl.load(DL + b * n + t, mask=t_ok, other=NEG_INF).to(acc_t)
        live = row_ok[:, None] & t_ok[None, :]
        if HAS_POS:
            kpos = tl.load(KPOS + b * n + t, mask=t_ok, other=0)
            live = live & (kpos[None, :] <= qpos[:, None])
        an = tl.where(live, a + nl[None, :], NEG_INF)
        ad = tl.where(live, a + dl[None, :], NEG_INF)
        # ---- running max-shifted sums (a row with no live slot keeps max -inf and sum 0)
        mn_new = tl.maximum(mn, tl.max(an, axis=1))
        md_new = tl.maximum(md, tl.max(ad, axis=1))
        mn_safe = tl.where(mn_new == NEG_INF, 0.0, mn_new)
        md_safe = tl.where(md_new == NEG_INF, 0.0, md_new)
        pn = tl.exp(an - mn_safe[:, None])
        pd = tl.exp(ad - md_safe[:, None])
        alpha_n = tl.exp(mn - mn_safe)
        alpha_d = tl.exp(md - md_safe)
        if LOW_PREC_DOT == 1:
            pv = tl.dot(pn.to(tl.float16), vt.to(tl.float16)).to(acc_t)
        elif LOW_PREC_DOT == 2:
            pv = tl.dot(pn.to(tl.bfloat16), vt.to(tl.bfloat16)).to(acc_t)
        elif F64:
            pv = tl.dot(pn, vt)
        else:
            pv = tl.dot(pn, vt, input_precision="ieee")
        sn = sn * alpha_n[:, None] + pv
        sd = sd * alpha_d + tl.sum(pd, axis=1)
        mn = mn_new
        md = md_new

    o = (b * num_splits + split) * R + rows
    tl.store(MN + o, mn, mask=row_ok)
    tl.store(MD + o, md, mask=row_ok)
    tl.store(SD + o, sd, mask=row_ok)
    tl.store(SN + o[:, None] * s + cs[None, :], sn, mask=row_ok[:, None] & (cs[None, :] < s))
