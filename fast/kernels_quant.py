"""Triton kernels: asymmetric min-max quantization fused with bit packing, and unpacking (SPEC section 6).

Both work on a 3-D view ``x[l, r, c]`` (any strides) in which quantization groups
and packing run along ``c``: for values (per-token) ``r`` is the token and ``c`` the
channel; for keys (per-channel) the host passes the transposed view, ``r`` the
channel and ``c`` the token. One program quantizes a ``(BLOCK_R, BLOCK_C)`` tile:
group min/max, scale and zero rounded to the storage dtype, codes by true
(IEEE-rounded) float32 division and half-up rounding, then ``32/b`` codes per int32
word, little end first. Arithmetic mirrors :func:`balancekv.reference.quantization.quantize`
step by step, so codes, scales and zeros are bit-identical.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import interpreting

_INTERPRETED = interpreting()


@triton.jit
def quantize_pack_kernel(
    X,
    W,
    S,
    Z,
    rows,
    cols,
    sx_l,
    sx_r,
    sx_c,
    sw_l,
    sw_r,
    sw_c,
    ss_l,
    ss_r,
    ss_g,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_F16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    l = tl.program_id(0)
    pr = tl.program_id(1)
    pc = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(X + l * sx_l + r[:, None] * sx_r + c[None, :] * sx_c, mask=ok, other=0.0).to(tl.float32)
    NG: tl.constexpr = BLOCK_C // GROUP
    okg = tl.reshape(ok, (BLOCK_R, NG, GROUP))
    xg = tl.reshape(x, (BLOCK_R, NG, GROUP))
    mn = tl.min(tl.where(okg, xg, float("inf")), axis=2)
    mx = tl.max(tl.where(okg, xg, float("-inf")), axis=2)
    g_ok = tl.max(okg.to(tl.int32), axis=2) > 0
    mn = tl.where(g_ok, mn, 0.0)
    mx = tl.where(g_ok, mx, 0.0)
    sc = tl.math.div_rn(mx - mn, tl.full(mn.shape, QMAX, tl.float32))
    if SCALE_F16:
        sc_st = sc.to(tl.float16)
        ze_st = mn.to(tl.float16)
    else:
        sc_st = sc
        ze_st = mn
    g = pc * NG + tl.arange(0, NG)
    soff = l * ss_l + r[:, None] * ss_r + g[None, :] * ss_g
    smask = (r[:, None] < rows) & g_ok
    tl.store(S + soff, sc_st, mask=smask)
    tl.store(Z + soff, ze_st, mask=smask)
    scb = tl.broadcast_to(sc_st.to(tl.float32)[:, :, None], (BLOCK_R, NG, GROUP))
    zeb = tl.broadcast_to(ze_st.to(tl.float32)[:, :, None], (BLOCK_R, NG, GROUP))
    y = tl.math.div_rn(xg - zeb, tl.where(scb > 0, scb, 1.0)) + 0.5
    code = tl.minimum(tl.maximum(tl.floor(y), 0.0), QMAX * 1.0)
    code = tl.where((scb > 0) & okg, code, 0.0).to(tl.int32)
    # pack PER consecutive codes along c into one word (disjoint bit fields: sum == or)
    NW: tl.constexpr = BLOCK_C // PER
    code = tl.reshape(code, (BLOCK_R, NW, PER))
    shift = (tl.arange(0, PER) * BITS)[None, None, :]
    words = tl.sum(code << shift, axis=2)
    wc = pc * NW + tl.arange(0, NW)
    wmask = (r[:, None] < rows) & (wc[None, :] * PER < cols)
    tl.store(W + l * sw_l + r[:, None] * sw_r + wc[None, :] * sw_c, words, mask=wmask)


@triton.jit
def unpack_kernel(
    W,
    C,
    rows,
    cols,
    sw_l,
    sw_r,
    sw_c,
    sc_l,
    sc_r,
    sc_c,
    BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    l = tl.program_id(0)
    pr = tl.program_id(1)
    pc = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r[:, None] < rows) & (c[None, :] < cols)
    w = tl.load(W + l * sw_l + r[:, None] * sw_r + (c[None, :] // PER) * sw_c, mask=ok, other=0)
    code = (w >> ((c[None, :] % PER) * BITS)) & ((1 << BITS) - 1)
    tl.store(C + l * sc_l + r[:, None] * sc_r + c[None, :] * sc_c, code.to(tl.uint8), mask=ok)
