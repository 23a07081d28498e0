"""Low-bit quantization and packing (SPEC section 6) in torch, with fused Triton quantize+pack.

Same names and semantics as :mod:`balancekv.reference.quantization`, whose
bit-exactness contract this module follows operation by operation (float32
casts, true division, rounding of scale and zero to the storage dtype *before*
the codes are computed, half-up rounding), so codes, scales and zeros are
bit-identical to the reference on every input (SPEC section 11).

Entry points take and return torch tensors (NumPy input is accepted and converted).
``quantize_pack`` is the fused path a decode cache uses: codes go straight into
int32 words without materialising the uint8 code tensor (Triton on CUDA / under
the interpreter, torch otherwise).
"""

from __future__ import annotations

import numpy as np
import torch
from balancekv.reference.quantization import BITS, SCALE_DTYPES  # noqa: F401  (the shared constants)

from . import _triton as T

__all__ = ["dequantize", "dequantize_packed", "pack", "quantize", "quantize_pack", "unpack"]

_TORCH_SCALE = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _tensor(x, name):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch tensor or NumPy array, got {type(x).__name__}")


def _checks(x, bits, group, axis, scale_dtype):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must have a real floating dtype, got {x.dtype}")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array with {x.ndim} dims")
    ax = int(axis) % x.ndim
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if x.shape[ax] % group:
        raise ValueError(f"group={group} must divide the length {x.shape[ax]} of the quantized axis")
    sdt = _TORCH_SCALE.get(
        np.dtype(scale_dtype)
        if not isinstance(scale_dtype, torch.dtype)
        else np.dtype(str(scale_dtype).replace("torch.", ""))
    )
    if sdt is None:
        raise ValueError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
    big = float(x.abs().amax()) if x.numel() else 0.0  # one reduction: NaN and Inf propagate into it
    if not np.isfinite(big):
        raise ValueError("x contains NaN or Inf")
    if big > torch.finfo(sdt).max:
        raise ValueError(
            f"x has entries of magnitude above {torch.finfo(sdt).max:g}, beyond the range of "
            f"scale_dtype {sdt}; pass scale_dtype=np.float32"
        )
    return int(bits), int(group), ax, sdt


def _quantize_torch(x, bits, group, ax, sdt):
    """The reference arithmetic on a grouped *view* of ``x`` (groups along ``ax``, no transposition of the
    floats): scales and zeros come out in the reference layout directly."""
    Q = torch.tensor(float(2**bits - 1), dtype=torch.float32, device=x.device)
    x32 = x.to(torch.float32)
    shp = tuple(x32.shape)
    gd = ax + 1  # the within-group dim of the view
    g = x32.reshape(shp[:ax] + (shp[ax] // group, group) + shp[ax + 1 :])
    m, M = torch.aminmax(g, dim=gd)  # (one pass: the same minima and maxima as amin and amax)
    s_star = (M - m) / Q  # float32 subtraction, true division
    zero = m.to(sdt)
    scale = s_star.to(sdt)
    z32 = zero.to(torch.float32).unsqueeze(gd)
    s32 = scale.to(torch.float32).unsqueeze(gd)
    pos = s32 > 0
    y = torch.where(pos, (g - z32) / torch.where(pos, s32, torch.ones_like(s32)), torch.zeros((), device=x.device))
    w = y + 0.5
    codes = torch.floor(w).clamp(0, float(2**bits - 1)).to(torch.uint8).reshape(shp)
    return codes, scale, zero


def _as3d(x, ax):
    """``(L, r, c)`` view with ``c`` the quantized axis (no copy where strides allow)."""
    moved = x.movedim(ax, -1)
    c = moved.shape[-1]
    lead = moved.shape[:-1]
    r = lead[-1] if lead else 1
    return moved.reshape(-1, r, c), lead


def _quantize_pack_triton(x, bits, group, ax, sdt, block_r=None):
    ker = T.kernels("kernels_quant")
    x3, lead = _as3d(x, ax)
    Ln, rows, cols = x3.shape
    per = 32 // bits
    W = -(-cols // per)
    dev = x.device
    words = torch.empty((Ln, rows, W), dtype=torch.int32, device=dev)
    # scales in the reference layout: x's shape with ``ax`` shortened to cols/group
    sshape = list(x.shape)
    sshape[ax] = cols // group
    scale = torch.empty(sshape, dtype=sdt, device=dev)
    zero = torch.empty(sshape, dtype=sdt, device=dev)
    s3, _ = _as3d(scale, ax)
    z3, _ = _as3d(zero, ax)
    if s3.data_ptr() != scale.data_ptr() or z3.data_ptr() != zero.data_ptr():  # pragma: no cover
        raise RuntimeError("internal: scale view is not a view")
    block_c = max(16, group, per, min(T.next_pow2(cols), 128))
    block_c = max(block_c, T.next_pow2(max(group, per)))
    if block_c % group or block_c % per:
        block_c = T.next_pow2(group) * per  # keep both divisors (group and per are powers of two here)
    if block_r is None:
        block_r = 16 if dev.type == "cuda" else max(1, min(16, T.next_pow2(rows)))
    grid = (Ln, -(-rows // block_r), -(-cols // block_c))
    ker.quantize_pack_kernel[grid](
        x3,
        words,
        s3,
        z3,
        rows,
        cols,
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        words.stride(0),
        words.stride(1),
        words.stride(2),
        s3.stride(0),
        s3.stride(1),
        s3.stride(2),
        BITS=bits,
        GROUP=group,
        SCALE_F16=sdt == torch.float16,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return words.reshape(tuple(lead) + (W,)), scale, zero


def quantize(x, bits: int, group: int, axis: int, scale_dtype=np.float16, *, backend: str = "auto"):
    """``(codes uint8, scale, zero)`` exactly as the reference (NumPy in, NumPy out; torch stays torch)."""
    if not isinstance(x, torch.Tensor):
        return tuple(
            t.cpu().numpy() for t in quantize(_tensor(x, "x"), bits, group, axis, scale_dtype, backend=backend)
        )
    xt = x
    b, G, ax, sdt = _checks(xt, bits, group, axis, scale_dtype)
    if G & (G - 1) == 0 and T.use_triton(backend, xt):
        words, scale, zero = _quantize_pack_triton(xt, b, G, ax, sdt)
        return unpack(words, b, ax, xt.shape[ax], backend=backend), scale, zero
    return _quantize_torch(xt, b, G, ax, sdt)


def quantize_pack(x, bits: int, group: int, axis: int, scale_dtype=np.float16, *, backend: str = "auto"):
    """``(words int32, scale, zero)`` = ``pack(quantize(x)[0], bits, axis)`` and the scales, fused.

    Triton (one pass over ``x``, codes never stored) when ``group`` is a power of two and the
    backend allows it; otherwise the torch quantizer followed by :func:`pack`.
    """
    if not isinstance(x, torch.Tensor):
        return tuple(
            t.cpu().numpy() for t in quantize_pack(_tensor(x, "x"), bits, group, axis, scale_dtype, backend=backend)
        )
    xt = x
    b, G, ax, sdt = _checks(xt, bits, group, axis, scale_dtype)
    if G & (G - 1) == 0 and T.use_triton(backend, xt):
        return _quantize_pack_triton(xt, b, G, ax, sdt)
    codes, scale, zero = _quantize_torch(xt, b, G, ax, sdt)
    return _pack_codes(codes, b, ax), scale, zero


def dequantize(codes, scale, zero, group: int, axis: int) -> torch.Tensor:
    """``code * scale + zero`` in float64 (exact for float16 scales), the shape of ``codes``."""
    c = _tensor(codes, "codes")
    if torch.is_floating_point(c) or c.is_complex():
        raise TypeError(f"codes must be integers, got {c.dtype}")
    ax = int(axis) % c.ndim
    sc, ze = _tensor(scale, "scale"), _tensor(zero, "zero")
    want = list(c.shape)
    want[ax] = -(-c.shape[ax] // group)
    if list(sc.shape) != want or list(ze.shape) != want or c.shape[ax] % group:
        raise ValueError(
            f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} do not match codes "
            f"{tuple(c.shape)} with group={group} along axis {axis}"
        )
    out = _affine_last(c.movedim(ax, -1), sc.movedim(ax, -1), ze.movedim(ax, -1), group, torch.float64)
    return out.movedim(-1, ax)


def _affine_last(codes, scale, zero, group: int, dtype):
    """``code * scale + zero`` in ``dtype`` with groups of ``group`` along the last axis: ``codes (…, g*G)``,
    ``scale``, ``zero`` ``(…, g)`` (broadcast, never repeated). The one torch dequantization arithmetic
    (the Triton kernels inline the same)."""
    g = scale.shape[-1]
    c = codes.reshape(*codes.shape[:-1], g, group).to(dtype)
    out = torch.addcmul(zero.to(dtype)[..., None], c, scale.to(dtype)[..., None])
    return out.reshape(*codes.shape[:-1], g * group)


def pack(codes, bits: int, axis: int) -> torch.Tensor:
    """int32 words, ``32/b`` codes each, little end first, along ``axis`` moved last (as the reference)."""
    c = _tensor(codes, "codes")
    if isinstance(bits, bool) or int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if torch.is_floating_point(c):
        raise TypeError(f"codes must be integers, got {c.dtype}")
    b = int(bits)
    ax = int(axis) % c.ndim
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 2**b - 1):
        raise ValueError(f"codes must lie in [0, {2**b - 1}] for bits={b}")
    per = 32 // b
    c = c.movedim(ax, -1).to(torch.int32)
    L = c.shape[-1]
    W = -(-L // per)
    if W * per != L:
        c = torch.cat([c, c.new_zeros(c.shape[:-1] + (W * per - L,))], dim=-1)
    c = c.reshape(c.shape[:-1] + (W, per))
    # int32 arithmetic without overflow: the low codes sum to < 2^(32-b) (disjoint bit fields: sum == or);
    # the top code is taken as a signed b-bit number times 2^(32-b), in [-2^31, 2^31), which gives the
    # two's-complement word of the unsigned bit pattern
    words = c[..., per - 1] - (c[..., per - 1] >= 2 ** (b - 1)).to(torch.int32) * (2**b)
    words = words * (2 ** (32 - b))
    if per > 1:
        weights = torch.tensor([2 ** (j * b) for j in range(per - 1)], dtype=torch.int32, device=c.device)
        words = words + (c[..., : per - 1] * weights).sum(-1, dtype=torch.int32)
    return words.contiguous()


def _pack_codes(codes, b: int, ax: int) -> torch.Tensor:
    """:func:`pack` of codes the quantizer made (in range by construction: no checks, no host syncs), in few
    ops: int64 shifts of every code into its field, one sum, and the two's-complement int32 of the word
    (exact: the int64 words lie in ``[0, 2^32)``). The same words as :func:`pack`."""
    per = 32 // b
    c = codes.movedim(ax, -1).to(torch.int64)
    n = c.shape[-1]
    W = -(-n // per)
    if W * per != n:
        c = torch.nn.functional.pad(c, (0, W * per - n))
    shifts = torch.arange(0, 32, b, dtype=torch.int64, device=c.device)
    words = torch.bitwise_left_shift(c.reshape(c.shape[:-1] + (W, per)), shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed, bits: int, axis: int, length: int, *, backend: str = "auto") -> torch.Tensor:
    """uint8 codes (inverse of :func:`pack`) with the unpacked axis of size ``length`` at ``axis``."""
    p = _tensor(packed, "packed")
    if p.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {p.dtype}")
    if isinstance(bits, bool) or int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    b = int(bits)
    per = 32 // b
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= p.shape[-1] * per:
        raise ValueError(f"length must be an int in [0, {p.shape[-1] * per}], got {length!r}")
    ax = int(axis) % p.ndim
    if length > 0 and T.use_triton(backend, p):
        ker = T.kernels("kernels_quant")
        lead = p.shape[:-1]
        r = lead[-1] if lead else 1
        p3 = p.reshape(-1, r, p.shape[-1])
        out = torch.empty(p3.shape[:2] + (length,), dtype=torch.uint8, device=p.device)
        block_r = 16 if p.is_cuda else max(1, min(16, T.next_pow2(r)))
        block_c = 128 if p.is_cuda else max(16, min(128, T.next_pow2(length)))
        grid = (p3.shape[0], -(-r // block_r), -(-length // block_c))
        ker.unpack_kernel[grid](
            p3,
            out,
            r,
            length,
            p3.stride(0),
            p3.stride(1),
            p3.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            BITS=b,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
        return out.reshape(tuple(lead) + (length,)).movedim(-1, ax)
    w = p.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, device=p.device, dtype=torch.int64) * b
    c = ((w[..., None] >> shifts) & (2**b - 1)).to(torch.uint8)
    c = c.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :length]
    return c.movedim(-1, ax)


def dequantize_packed(words, scale, zero, bits: int, group: int, axis: str, f: int, start: int = 0, n=None, dtype=None):
    """Tokens ``[start, start + n)`` of a packed store as floats ``(L, n, f)``: ``code * scale + zero``.

    The one torch dequantization (CPU decode attention, :meth:`Packed.dense`, quantized stores'
    ``dense()``). ``axis="tokens"`` (keys): ``words (L, f, W)`` packed along tokens, ``scale``,
    ``zero`` ``(L, groups, f)``; ``axis="channels"`` (values): ``words (L, rows, W)`` packed along
    channels, ``scale``, ``zero`` ``(L, rows, f / group)``. Buffers may hold more tokens than are
    read (spare capacity). Only the words and groups covering the range are unpacked. The
    arithmetic runs in float64 for ``dtype=float64`` (the reference's numbers exactly) and in float32
    otherwise, then the result is cast to ``dtype`` (default float32).
    """
    dtype = dtype or torch.float32
    cdt = torch.float64 if dtype == torch.float64 else torch.float32  # half outputs: float32 arithmetic, one rounding
    b = int(bits)
    per = 32 // b
    mask = (1 << b) - 1
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * b
    unpack_words = lambda w: ((w[..., None] >> shifts) & mask).reshape(*w.shape[:-1], -1)
    if axis in ("tokens", -2):
        n = words.shape[-1] * per - start if n is None else int(n)
        g0, g1 = start // group, -(-(start + n) // group)
        t0, t1 = g0 * group, g1 * group  # whole groups covering the range
        w0 = t0 // per
        codes = unpack_words(words[..., w0 : -(-t1 // per)])[..., t0 - w0 * per : t1 - w0 * per]  # (L, f, <= t1-t0)
        if codes.shape[-1] < t1 - t0:  # the last group runs past the buffer (never read): pad
            codes = torch.nn.functional.pad(codes, (0, t1 - t0 - codes.shape[-1]))
        sc, ze = scale[..., g0:g1, :].transpose(-1, -2), zero[..., g0:g1, :].transpose(-1, -2)  # (L, f, g)
        out = _affine_last(codes, sc, ze, group, cdt)[..., start - t0 : start - t0 + n]
        return out.transpose(-1, -2).to(dtype)  # (L, n, f)
    n = words.shape[-2] - start if n is None else int(n)
    ng = scale.shape[-1]
    codes = unpack_words(words[..., start : start + n, :])[..., : ng * group]
    out = _affine_last(codes, scale[..., start : start + n, :], zero[..., start : start + n, :], group, cdt)
    return out[..., :f].to(dtype)
