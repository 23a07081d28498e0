"""Asymmetric min-max low-bit quantization and bit packing [KIVI, MINI] (SPEC section 6).

A group ``x_g`` of ``G`` numbers is stored as ``b``-bit codes plus one scale and
one zero point::

    zero = min(x_g);   scale = (max(x_g) - min(x_g)) / (2^b - 1)
    code = clamp(floor((x - zero) / scale + 1/2), 0, 2^b - 1)
    x^   = code * scale + zero

Keys are quantized *per channel* with groups of ``G`` consecutive tokens
(``axis=-2``; scales of shape ``(..., T/G, d)``), values *per token* with groups
of ``G`` consecutive channels (``axis=-1``; scales ``(..., T, d/G)``): the
arrangement KIVI (arXiv 2402.02750, Sec. 3) found to be the only 2-bit layout
that keeps model quality.

Bit-exactness contract (the torch and Triton versions in :mod:`balancekv.fast`
must give bit-identical codes, scales and zeros)
----------------------------------------------------------------------------
1. ``x`` is cast to float32 (round to nearest even). Every step below is an
   IEEE float32 operation with round-to-nearest-even, no fused multiply-add.
2. Per group: ``m = min``, ``M = max`` (exact), ``D = M - m`` (one float32
   subtraction), ``s* = D / Q`` with ``Q = 2^b - 1`` as a float32 *true
   division* (not ``D * (1/Q)``).
3. ``zero = m`` and ``scale = s*`` are rounded (nearest even) to
   ``scale_dtype`` (float16 by default) and *stored*. Values whose magnitude
   would overflow ``scale_dtype`` are refused (``ValueError``).
4. Codes use the *stored* (rounded) ``zero`` and ``scale``, cast back to
   float32 (exact): ``y = (x - zero) / scale`` as two float32 operations (a
   subtraction, then a true division), ``w = y + 0.5`` in float32,
   ``code = clamp(floor(w), 0, Q)``. Where the stored ``scale == 0`` (a constant
   group, or a range so small that the scale rounds to zero) the code is 0 and
   no division is performed, so nothing is ever NaN.
5. Rounding is half up: ``floor(y + 1/2)``, never round-half-even.

Dequantization computes ``code * scale + zero`` in float64; for float16
scales and zeros this is *exact* (both terms are multiples of ``2^-24`` below
``2^17``, 41 bits in all), so the reconstruction does not depend on the
implementation. A constant group reconstructs to exactly the stored zero,
i.e. ``min`` rounded to ``scale_dtype`` (exactly ``min`` when ``min`` is
representable, e.g. fp16 data or ``scale_dtype=float32`` with float32 data).

Error bound (proved in ``proofs/quantization.md``, evaluated by
:func:`balancekv.bounds.quantization.element_error_bound`): per element
``|x - x^| <= scale/2 + slack`` where the slack is dominated by the rounding
of the stored zero, ``|zero - m|``, and ``Q`` times the rounding of the stored
scale, ``Q * |scale - (M - m)/Q|``, plus ``O(2^-24)`` relative float32 terms.

Packing: ``32/b`` codes per int32 word, little end first (code ``j`` of a word
sits at bits ``[j*b, (j+1)*b)``). :func:`pack` moves ``axis`` to the last
position and packs along it: keys ``(..., T, d)`` with ``axis=-2`` become
``(..., d, T*b/32)``; values with ``axis=-1`` become ``(..., T, d*b/32)``.
"""

from __future__ import annotations

import numpy as np

BITS = (2, 4, 8)
SCALE_DTYPES = (np.float16, np.float32)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return int(bits)


def _check_axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dims")
    return int(axis) % ndim


def _check_group(group, length: int) -> int:
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise TypeError(f"group must be an int, got {type(group).__name__}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if length % group:
        raise ValueError(f"group={group} must divide the length {length} of the quantized axis")
    return int(group)


def _check_scale_dtype(scale_dtype):
    dt = np.dtype(scale_dtype)
    if dt not in [np.dtype(t) for t in SCALE_DTYPES]:
        raise ValueError(f"scale_dtype must be float16 or float32, got {dt}")
    return dt


def quantize(x, bits: int, group: int, axis: int, scale_dtype=np.float16):
    """Quantize ``x`` in groups of ``group`` consecutive entries along ``axis``.

    Returns ``(codes, scale, zero)``: ``codes`` (uint8, the shape of ``x``), and
    ``scale``, ``zero`` in ``scale_dtype`` with the shape of ``x`` except that
    ``axis`` has length ``x.shape[axis] / group``. Keys ``(..., T, d)``: ``axis=-2``
    gives scales ``(..., T/G, d)``; values: ``axis=-1`` gives ``(..., T, d/G)``.
    Follows the bit-exactness contract of the module docstring.
    """
    b = _check_bits(bits)
    xa = np.asarray(x)
    if not np.issubdtype(xa.dtype, np.floating):
        raise TypeError(f"x must have a real floating dtype, got {xa.dtype}")
    if xa.ndim < 1:
        raise ValueError("x must have at least one dimension")
    ax = _check_axis(axis, xa.ndim)
    G = _check_group(group, xa.shape[ax])
    sdt = _check_scale_dtype(scale_dtype)
    if not np.all(np.isfinite(xa)):
        raise ValueError("x contains NaN or Inf")
    Q = np.float32(2**b - 1)
    x32 = np.moveaxis(xa.astype(np.float32), ax, -1)
    L = x32.shape[-1]
    g = x32.reshape(x32.shape[:-1] + (L // G, G))
    m = g.min(axis=-1)
    M = g.max(axis=-1)
    big = float(np.finfo(sdt).max)
    if g.size and max(float(np.abs(m).max()), float(np.abs(M).max())) > big:
        raise ValueError(
            f"x has entries of magnitude above {big:g}, beyond the range of scale_dtype "
            f"{sdt}; pass scale_dtype=np.float32"
        )
    s_star = (M - m) / Q  # float32 subtraction, float32 true division
    zero = m.astype(sdt)  # round to nearest even
    scale = s_star.astype(sdt)
    z32 = zero.astype(np.float32)[..., None]  # exact
    s32 = scale.astype(np.float32)[..., None]
    pos = s32 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(pos, (g - z32) / np.where(pos, s32, np.float32(1)), np.float32(0))
    w = y + np.float32(0.5)
    codes = np.clip(np.floor(w), 0, Q).astype(np.uint8)
    codes = np.moveaxis(codes.reshape(x32.shape), -1, ax)
    return codes, np.moveaxis(scale, -1, ax), np.moveaxis(zero, -1, ax)


def dequantize(codes, scale, zero, group: int, axis: int) -> np.ndarray:
    """``code * scale + zero`` in float64 (exact for float16 scale and zero), the shape of ``codes``."""
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {c.dtype}")
    ax = _check_axis(axis, c.ndim)
    G = _check_group(group, c.shape[ax])
    s = np.repeat(np.asarray(scale, np.float64), G, axis=ax)
    z = np.repeat(np.asarray(zero, np.float64), G, axis=ax)
    if s.shape != c.shape or z.shape != c.shape:
        raise ValueError(
            f"scale {np.shape(scale)} and zero {np.shape(zero)} do not match codes {c.shape} "
            f"with group={G} along axis {axis}"
        )
    return c.astype(np.float64) * s + z


def pack(codes, bits: int, axis: int) -> np.ndarray:
    """Pack ``b``-bit codes ``32/b`` to an int32 word along ``axis`` (moved to the last position).

    Code ``j`` of a word occupies bits ``[j*b, (j+1)*b)`` (little end first). If the
    axis length is not a multiple of ``32/b`` the last word is padded with zero codes
    (:func:`unpack` takes the true length). Returns int32 of shape
    ``moveaxis(codes, axis, -1).shape[:-1] + (ceil(L*b/32),)``.
    """
    b = _check_bits(bits)
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {c.dtype}")
    ax = _check_axis(axis, c.ndim)
    if c.size and (c.min() < 0 or c.max() > 2**b - 1):
        raise ValueError(f"codes must lie in [0, {2**b - 1}] for bits={b}")
    per = 32 // b
    c = np.moveaxis(c, ax, -1).astype(np.uint32)
    L = c.shape[-1]
    W = -(-L // per)
    if W * per != L:
        c = np.concatenate([c, np.zeros(c.shape[:-1] + (W * per - L,), np.uint32)], axis=-1)
    c = c.reshape(c.shape[:-1] + (W, per))
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(b)
    words = np.bitwise_or.reduce(c << shifts, axis=-1) if per > 1 else c[..., 0]
    return np.ascontiguousarray(words.astype(np.uint32).view(np.int32))


def unpack(packed, bits: int, axis: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 codes with the unpacked axis of size ``length`` placed at ``axis``.

    ``packed`` has the packed words on its last axis; ``axis`` refers to the output's dims
    (the same ``axis`` that was given to :func:`pack`).
    """
    b = _check_bits(bits)
    p = np.asarray(packed)
    if p.dtype != np.int32:
        raise TypeError(f"packed must be int32, got {p.dtype}")
    per = 32 // b
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= p.shape[-1] * per:
        raise ValueError(f"length must be an int in [0, {p.shape[-1] * per}], got {length!r}")
    ax = _check_axis(axis, p.ndim)
    w = p.view(np.uint32)[..., None]
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(b)
    c = ((w >> shifts) & np.uint32(2**b - 1)).astype(np.uint8)
    c = c.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :length]
    return np.moveaxis(c, -1, ax)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits each, rounded up to a whole byte."""
    return -(-int(count) * int(bits) // 8)
