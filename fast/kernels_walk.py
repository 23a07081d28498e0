"""Triton kernels: the self-balancing walk on a Gram tile held in registers (SPEC sections 2, 4b, 10).

One program per independent problem (batch x head x block). The Gram tile is
either read (theory walk, :func:`gram_walk_kernel`) or built with ``tl.dot`` from
the block's keys and values (practical blocked walk, :func:`blocked_walk_kernel`);
the sign loop is then sequential, keeping the running dots
``run_k = sum_{j < i} G_kj x_j`` of every later token in registers: step ``i`` reads
``run_i``, draws its sign from the given uniform, and adds ``x_i G_{:, i}``.
Randomness is an input, so signs match the reference for the same uniforms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import interpreting

_INTERPRETED = interpreting()


@triton.jit
def gram_walk_kernel(G, U, C, X, FAIL, n, sg_b, sg_i, sg_j, F64: tl.constexpr, BLOCK: tl.constexpr):
    """[ALS] walk with FAIL: ``x_i = +1`` iff ``r_i < 1/2 - g/(2c)``; FAIL iff ``|g| > c``."""
    b = tl.program_id(0)
    ft = tl.float64 if F64 else tl.float32
    idx = tl.arange(0, BLOCK)
    ok = idx < n
    Gt = tl.load(
        G + b * sg_b + idx[:, None] * sg_i + idx[None, :] * sg_j, mask=ok[:, None] & ok[None, :], other=0.0
    ).to(ft)
    c = tl.load(C + b).to(ft)
    two_c = 2.0 * c
    run = tl.zeros((BLOCK,), ft)
    x = tl.zeros((BLOCK,), ft)
    failed = tl.full((BLOCK,), -1, tl.int32)  # the same value in every lane
    for i in range(n):
        at_i = idx == i
        g = tl.sum(tl.where(at_i, run, 0.0), axis=0)
        r = tl.load(U + b * n + i).to(ft)
        # (int products instead of `&`: the interpreter cannot `&` a scalar bool with a vector)
        fail_now = ((failed < 0).to(tl.int32) * (tl.abs(g) > c).to(tl.int32)) != 0
        failed = tl.where(fail_now, i, failed)
        if F64:
            p = 0.5 - g / two_c  # fp64 division is IEEE-rounded
        else:
            p = 0.5 - tl.math.div_rn(g, two_c)  # fp32 `/` is approximate by default
        xi = tl.where(r < p, 1.0, -1.0)
        xi = tl.where(failed < 0, xi, 0.0)
        x = tl.where(at_i, xi, x)
        col = tl.sum(tl.where(idx[None, :] == i, Gt, 0.0), axis=1)  # G[:, i]
        run = run + col * xi
    tl.store(X + b * n + idx, x.to(tl.int8), mask=ok)
    tl.store(FAIL + b + idx, failed, mask=idx == 0)


@triton.jit
def blocked_walk_kernel(
    K,
    V,
    U,
    WT,
    VALID,
    X,
    n,
    d,
    s,
    coef,
    beta,
    gamma,
    a2,
    exp_clip,
    sk_b,
    sk_t,
    sk_c,
    sv_b,
    sv_t,
    sv_c,
    CENTER_V: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One round of SPEC 4b steps 2-4 for one block (definition: ``reference.blocked_balance``)."""
    b = tl.program_id(0)
    ft = tl.float64 if F64 else tl.float32
    idx = tl.arange(0, BLOCK)
    cd = tl.arange(0, BLOCK_D)
    cs = tl.arange(0, BLOCK_S)
    in_n = idx < n
    valid = tl.load(VALID + b * n + idx, mask=in_n, other=0) != 0
    okf = valid.to(ft)
    w = tl.load(WT + b * n + idx, mask=in_n, other=0.0).to(ft)
    nv = tl.maximum(tl.sum(okf, axis=0), 1.0)
    kmask = valid[:, None] & (cd[None, :] < d)
    k = tl.load(K + b * sk_b + idx[:, None] * sk_t + cd[None, :] * sk_c, mask=kmask, other=0.0).to(ft)
    kbar = tl.sum(k, axis=0) / nv
    k = tl.where(kmask, k - kbar[None, :], 0.0)
    vmask = valid[:, None] & (cs[None, :] < s)
    v = tl.load(V + b * sv_b + idx[:, None] * sv_t + cs[None, :] * sv_c, mask=vmask, other=0.0).to(ft)
    if CENTER_V:
        wv = w * okf
        wsum = tl.maximum(tl.sum(wv, axis=0), 2.2250738585072014e-308 if F64 else 1.1754943508222875e-38)
        vbar = tl.sum(v * wv[:, None], axis=0) / wsum
        v = w[:, None] * (v - vbar[None, :])
    else:
        v = w[:, None] * v
    v = tl.where(vmask, v, 0.0)
    if F64:
        kk = tl.dot(k, tl.trans(k))
        vv = tl.dot(v, tl.trans(v))
    else:
        kk = tl.dot(k, tl.trans(k), input_precision="ieee")
        vv = tl.dot(v, tl.trans(v), input_precision="ieee")
    Gt = tl.exp(tl.minimum(coef * kk - beta, exp_clip)) * (vv + a2)
    run = tl.zeros((BLOCK,), ft)
    x = tl.zeros((BLOCK,), ft)
    seen = tl.zeros((BLOCK,), tl.int32)  # the same value in every lane
    for i in range(n):
        at_i = idx == i
        g = tl.sum(tl.where(at_i, run, 0.0), axis=0)
        ok_i = tl.sum(tl.where(at_i, valid.to(tl.int32), 0), axis=0)
        r = tl.load(U + b * n + i).to(ft)
        p = tl.minimum(tl.maximum(0.5 - gamma * g, 0.0), 1.0)
        xi = tl.where(r < p, 1.0, -1.0)
        xi = tl.where(seen > 0, xi, 1.0)  # first valid token: +1
        xi = tl.where(ok_i > 0, xi, 0.0)
        seen = tl.maximum(seen, ok_i)
        x = tl.where(at_i, xi, x)
        col = tl.sum(tl.where(idx[None, :] == i, Gt, 0.0), axis=1)  # kappa[:, i]
        run = run + col * xi
    tl.store(X + b * n + idx, x.to(tl.int8), mask=in_n)
