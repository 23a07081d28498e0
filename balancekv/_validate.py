"""Input validation shared by every public entry point (SPEC section 9).

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
shape or value) with a message that names the argument and says what was
expected. Checks never modify their input.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from ._arrays import is_torch, torch


def _all_finite_torch(x) -> bool:
    """Every entry of ``x`` finite. A sum is finite when every term is (an inf or NaN term makes it inf or
    NaN), so one reduction (no mask tensor) decides it unless the sum of finite entries overflows: then the
    elementwise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_array(name: str, x: Any, min_ndim: int = 2) -> None:
    """``x`` is a real floating NumPy array or torch tensor of at least ``min_ndim`` dims, all finite."""
    if is_torch(x):
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(f"{name} must have a real floating dtype, got torch {x.dtype}")
        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; use {name}.to_dense()")
        if x.device.type == "meta":
            raise TypeError(f"{name} is a meta tensor (it holds no data); materialise it on a real device first")
        ndim = x.dim()
        finite = _all_finite_torch(x) if x.numel() else True
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must have a real floating dtype, got numpy {x.dtype}")
        if not x.dtype.isnative:
            raise TypeError(f"{name} has a non-native byte order ({x.dtype.str}); use {name}.astype(float)")
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{name} must be float16, float32 or float64, got numpy {x.dtype}; use .astype(float)")
        ndim = x.ndim
        finite = bool(np.isfinite(x).all()) if x.size else True
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (..., tokens, features), got shape {tuple(x.shape)}"
        )
    if not finite:
        raise ValueError(f"{name} contains NaN or Inf")
    if any(int(k) == 0 for k in tuple(x.shape)[:-2]):
        raise ValueError(f"{name} has an empty leading (batch, head) dim: shape {tuple(x.shape)}")


def check_same_kind(names: tuple[str, ...], arrays: tuple[Any, ...]) -> None:
    kinds = {("torch", str(a.device)) if is_torch(a) else ("numpy", "cpu") for a in arrays}
    if len(kinds) > 1:
        desc = ", ".join(
            f"{n}: {'torch on ' + str(a.device) if is_torch(a) else 'numpy'}" for n, a in zip(names, arrays)
        )
        raise TypeError(f"{' and '.join(names)} must all be numpy arrays or all torch tensors on one device ({desc})")


def check_kv(K: Any, V: Any, k_name: str = "K", v_name: str = "V", allow_empty: bool = False) -> None:
    """Keys ``(..., n, d)`` and values ``(..., n, s)`` with matching leading dims and ``n``."""
    check_array(k_name, K)
    check_array(v_name, V)
    check_same_kind((k_name, v_name), (K, V))
    ks, vs = tuple(K.shape), tuple(V.shape)
    if ks[:-2] != vs[:-2]:
        raise ValueError(
            f"{k_name} and {v_name} must have the same leading (batch, head) dims, got {ks[:-2]} and {vs[:-2]}"
        )
    if ks[-2] != vs[-2]:
        raise ValueError(f"{k_name} and {v_name} must have the same number of tokens, got {ks[-2]} and {vs[-2]}")
    if not allow_empty and ks[-2] == 0:
        raise ValueError(f"{k_name} and {v_name} are empty (0 tokens); nothing to compress")
    if ks[-1] == 0 or vs[-1] == 0:
        raise ValueError(f"{k_name} and {v_name} must have a positive feature dimension, got {ks[-1]} and {vs[-1]}")


def check_queries(
    name: str, Q: Any, lead: tuple[int, ...], d: int, like: Any = None, against: str = "the cache"
) -> None:
    """Queries ``(..., m, d)`` with the leading dims and key dimension ``d`` of ``against`` (the cache, or the keys
    of :func:`balancekv.attention`), of ``like``'s kind."""
    check_array(name, Q)
    if like is not None:
        check_same_kind((name, against), (Q, like))
    qs = tuple(Q.shape)
    if qs[:-2] != tuple(lead):
        raise ValueError(f"{name} must have {against}'s leading (batch, head) dims {tuple(lead)}, got {qs[:-2]}")
    if qs[-1] != d:
        raise ValueError(f"{name} must have the key dimension d={d}, got {qs[-1]}")
    if qs[-2] == 0:
        raise ValueError(f"{name} holds no queries (0 rows)")


def check_scale(scale: Any) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and positive, got {scale}")


def check_open_unit(name: str, value: Any, *, closed_right: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = (0 < v <= 1) if closed_right else (0 < v < 1)
    if not ok:
        raise ValueError(f"{name} must lie in {'(0, 1]' if closed_right else '(0, 1)'}, got {value}")
    return v


def check_seed(seed: Any) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)
