"""Deterministic bounds for low-bit quantization (SPEC section 6; proofs/quantization.md).

Three results, each one function, used by the tests and quoted by the proof:

- :func:`element_error_bound` (Theorem Q1): per element
  ``|x - x^| <= scale/2 + slack``, with the float slack of the bit-exact
  float32/float16 pipeline of :mod:`balancekv.reference.quantization`;
- :func:`logit_error_bound` (Theorem Q2): ``|a_i - a^_i| <= Delta_i :=
  scale_q * sum_l |q_l| e_{il}``, where ``e_{il}`` bounds the error of key
  entry ``(i, l)``; with ``e_{il} = s_{l,g(i)}/2`` this is the SPEC's
  ``Delta = scale_q * sum_l |q_l| s_{l,g(i)} / 2``;
- :func:`attention_error_bound` (Theorem Q3): if every logit moves by at most
  ``Delta`` then ``||Attn^(q) - Attn(q)||_2 <= (e^{2 Delta} - 1) max_i ||v^_i||
  + max_i ||v_i - v^_i||_2``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["U32", "TINY", "element_error_bound", "element_float_slack", "logit_error_bound", "attention_error_bound"]

#: unit roundoff of float32 (round to nearest)
U32 = 2.0**-24
#: absolute term covering float32 underflow (subnormal) rounding; see proofs/quantization.md
TINY = 2.0**-140
#: relative rounding of the float64 dequantization ``code*scale + zero`` (zero for fp16 scales)
U64_DEQUANT = 2.0**-52


def _group_minmax(x: np.ndarray, group: int, axis: int):
    """Float32 group min and max, broadcast back to the shape of ``x``."""
    ax = axis % x.ndim
    x32 = np.moveaxis(x.astype(np.float32), ax, -1)
    g = x32.reshape(x32.shape[:-1] + (x32.shape[-1] // group, group))
    m = np.repeat(g.min(axis=-1), group, axis=-1)
    M = np.repeat(g.max(axis=-1), group, axis=-1)
    return np.moveaxis(m, -1, ax).astype(np.float64), np.moveaxis(M, -1, ax).astype(np.float64)


def element_float_slack(x, scale, zero, bits: int, group: int, axis: int) -> np.ndarray:
    """The float slack of Theorem Q1, per element of ``x`` (float64, the shape of ``x``).

    ``slack = |z - m| + Q |s - (M - m)/Q| + 4u |x' - z| + u s + u |x| + 2^-52 (|z| + Q s) + 2^-140``

    with ``x' = fl32(x)``, ``m, M`` the float32 group min and max, ``s, z`` the stored
    (rounded) scale and zero, ``Q = 2^b - 1`` and ``u = 2^-24``. The first two terms
    are the rounding of the stored zero and ``Q`` times the rounding of the stored
    scale (the only terms that matter in practice: for fp16 they are about
    ``2^-11 |m|`` and ``2^-11 Q s``); the rest are float32 arithmetic.
    """
    x = np.asarray(x)
    Q = 2.0**bits - 1
    m, M = _group_minmax(x, group, axis)
    s = np.repeat(np.asarray(scale, np.float64), group, axis=axis)
    z = np.repeat(np.asarray(zero, np.float64), group, axis=axis)
    x32 = x.astype(np.float32).astype(np.float64)
    return (
        np.abs(z - m)
        + Q * np.abs(s - (M - m) / Q)
        + 4 * U32 * np.abs(x32 - z)
        + U32 * s
        + U32 * np.abs(x.astype(np.float64))
        + U64_DEQUANT * (np.abs(z) + Q * s)
        + TINY
    )


def element_error_bound(x, scale, zero, bits: int, group: int, axis: int) -> np.ndarray:
    """Theorem Q1: ``|x - dequantize(quantize(x))| <= scale/2 + slack`` elementwise.

    ``scale`` and ``zero`` are the stored arrays returned by
    :func:`balancekv.reference.quantization.quantize` for the same ``bits, group, axis``.
    Returns the per-element bound (float64, the shape of ``x``).
    """
    s = np.repeat(np.asarray(scale, np.float64), group, axis=axis)
    return s / 2 + element_float_slack(x, scale, zero, bits, group, axis)


def logit_error_bound(q, key_err, scale: float) -> np.ndarray:
    """Theorem Q2: ``|scale <q, k_i - k^_i>| <= Delta_i = scale * sum_l |q_l| key_err[i, l]``.

    ``q (..., d)`` (one query per leading index), ``key_err (..., n, d)`` elementwise bounds
    on ``|k_il - k^_il|`` (e.g. :func:`element_error_bound`). Returns ``Delta_i (..., n)``.
    """
    return float(scale) * np.einsum(
        "...d,...nd->...n", np.abs(np.asarray(q, np.float64)), np.asarray(key_err, np.float64)
    )


def attention_error_bound(Delta, vhat_max_norm, v_err_max_norm):
    """Theorem Q3: ``(e^{2 Delta} - 1) * max_i ||v^_i|| + max_i ||v_i - v^_i||_2``.

    ``Delta`` bounds every logit perturbation ``|a^_i - a_i|`` for the query (max over
    slots; exact slots have 0). Holds for any single-set weighted estimator (the same
    log-weights in numerator and denominator), in particular for plain attention.
    """
    return np.expm1(2 * np.asarray(Delta, np.float64)) * vhat_max_norm + v_err_max_norm
