"""How a compressed cache's slots are stored, and what that storage costs.

A :class:`Segment` is a contiguous run of slots: keys, values, two log-weight
arrays and the original position of each slot. A :class:`~balancekv.CompressedKV`
is a list of segments concatenated along the token axis, so that exact tokens,
a compressed middle and a quantized block can sit side by side.

Keys and values are held by a *store*. :class:`DenseStore` keeps the floats
themselves; quantized stores (:mod:`balancekv.quantized`) keep codes, scales
and zeros and dequantize on read. Every store reports its own ``nbytes``.

Accounting convention (stated once, used everywhere): a dense entry is billed
at ``billed_bytes`` per element, 2 by default (fp16, the dtype of the input
cache that ``ratio`` compares against). The object holds dense entries at the
caller's precision, so errors we report exclude fp16 rounding (a relative
1e-3 effect, far below every compression error measured here). Log-weights
are billed per slot and per distinct weight set: 1 byte when every weight of
the set is a power of two ``2^k`` (halving methods; an int8 exponent holds it
exactly), else 4 bytes (fp32); a segment whose weights are all zero (exact
tokens) bills none. Padding slots (``-inf``
in both sets) are not billed: they exist only because heads keep different
numbers of slots in one rectangular array.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._arrays import Kind, is_torch, to_numpy, torch

WEIGHT_BYTES = 4
EXPONENT_BYTES = 1
FP16_BYTES = 2


def weight_bytes(logw: np.ndarray) -> int:
    """Bytes per slot for one weight set: 1 when every finite weight is a power of two ``2^k``
    with ``0 <= k < 128`` (halving methods: an int8 exponent stores it exactly; ``-inf``, "absent",
    takes a reserved code), otherwise 4 (fp32)."""
    fin = logw[np.isfinite(logw)]
    k = fin / np.log(2.0)
    if fin.size and np.all(np.abs(k - np.round(k)) < 1e-9) and np.all((k >= -0.5) & (k < 127.5)):
        return EXPONENT_BYTES
    return WEIGHT_BYTES


def xp_cat(arrays, axis: int):
    if is_torch(arrays[0]):
        return torch.cat(list(arrays), dim=axis)
    return np.concatenate(arrays, axis=axis)


class Store:
    """Protocol: ``dense()`` (…, m, f) array in the cache's kind; ``nbytes(valid)``; ``to_kind(kind)``."""

    shape: tuple

    def dense(self):  # pragma: no cover - interface
        raise NotImplementedError

    def nbytes(self, valid: np.ndarray) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def to_kind(self, kind: Kind) -> "Store":  # pragma: no cover - interface
        raise NotImplementedError

    def reshape_lead(self, lead: tuple) -> "Store":  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class DenseStore(Store):
    """Floats stored as they are; billed at ``billed_bytes`` per element (fp16 by default)."""

    x: Any
    billed_bytes: int = FP16_BYTES

    @property
    def shape(self):
        return tuple(self.x.shape)

    def dense(self):
        return self.x

    def nbytes(self, valid: np.ndarray) -> int:
        return int(np.count_nonzero(valid)) * self.shape[-1] * self.billed_bytes

    def to_kind(self, kind: Kind) -> "DenseStore":
        return replace(
            self,
            x=kind.wrap(to_numpy(self.x))
            if kind.is_torch or is_torch(self.x)
            else np.asarray(self.x, dtype=kind.dtype),
        )

    def reshape_lead(self, lead: tuple) -> "DenseStore":
        return replace(self, x=self.x.reshape(tuple(lead) + self.shape[-2:]))


@dataclass
class Segment:
    """A run of slots: key/value stores, log-weights ``(…, m)`` and original positions ``(…, m)``.

    ``positions[i]`` is the index in the input stream of the token stored in slot
    ``i`` (used for causal masking); padding slots hold position -1 and ``-inf``
    weights in both sets.
    """

    keys: Store
    values: Store
    num_logw: Any
    den_logw: Any
    positions: np.ndarray
    label: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def m(self) -> int:
        return self.keys.shape[-2]

    def valid(self) -> np.ndarray:
        nl, dl = to_numpy(self.num_logw), to_numpy(self.den_logw)
        return np.isfinite(nl) | np.isfinite(dl)

    def weight_nbytes(self) -> int:
        nl, dl = to_numpy(self.num_logw), to_numpy(self.den_logw)
        valid = np.isfinite(nl) | np.isfinite(dl)
        nv = int(np.count_nonzero(valid))
        if nv == 0:
            return 0
        if np.all(nl[valid] == 0) and np.all(dl[valid] == 0):
            return 0  # exact tokens: weight 1 is implied
        same = np.array_equal(nl[valid], dl[valid])
        sets = [nl[valid]] if same else [nl[valid], dl[valid]]
        return sum(nv * weight_bytes(w) for w in sets)

    def nbytes(self) -> int:
        valid = self.valid()
        return self.keys.nbytes(valid) + self.values.nbytes(valid) + self.weight_nbytes()

    def to_kind(self, kind: Kind) -> "Segment":
        return replace(
            self,
            keys=self.keys.to_kind(kind),
            values=self.values.to_kind(kind),
            num_logw=kind.wrap_float(to_numpy(self.num_logw)),
            den_logw=kind.wrap_float(to_numpy(self.den_logw)),
        )

    def reshape_lead(self, lead: tuple) -> "Segment":
        lead = tuple(lead)
        m = self.m
        return replace(
            self,
            keys=self.keys.reshape_lead(lead),
            values=self.values.reshape_lead(lead),
            num_logw=self.num_logw.reshape(lead + (m,)),
            den_logw=self.den_logw.reshape(lead + (m,)),
            positions=self.positions.reshape(lead + (m,)),
        )

    def masked(self, keep_heads: np.ndarray) -> "Segment":
        """The same segment with every slot of the heads where ``keep_heads`` is False made padding."""
        keep = np.asarray(keep_heads, bool)[..., None]
        nl = np.where(keep, to_numpy(self.num_logw), -np.inf)
        dl = np.where(keep, to_numpy(self.den_logw), -np.inf)
        kind = Kind.of(self.keys.dense())
        return replace(
            self,
            num_logw=kind.wrap_float(nl) if kind.is_torch else nl,
            den_logw=kind.wrap_float(dl) if kind.is_torch else dl,
            positions=np.where(keep, self.positions, -1),
        )


def dense_segment(K, V, num_logw, den_logw, positions, label: str = "") -> Segment:
    """A segment of dense keys ``K (…, m, d)`` and values ``V (…, m, s)``."""
    return Segment(DenseStore(K), DenseStore(V), num_logw, den_logw, np.asarray(positions, np.int64), label)


def exact_segment(K, V, positions, label: str = "exact") -> Segment:
    """Tokens kept exactly: log-weight 0 in both sets."""
    z = np.zeros(np.shape(K)[:-1])
    if is_torch(K):
        z = Kind.of(K).wrap_float(z)
    pos = np.broadcast_to(np.asarray(positions, np.int64), np.shape(K)[:-1]).copy()
    return dense_segment(K, V, z, z.clone() if is_torch(z) else z.copy(), pos, label)


def gather_tokens(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``X[..., idx[..., j], :]`` per leading index: rows ``idx (…, m)`` of ``X (…, n, f)``."""
    return np.take_along_axis(X, idx[..., None], axis=-2)


def compact_dense(segments: list[Segment], label: str = "") -> Segment:
    """One dense segment holding the valid slots of ``segments`` (NumPy, dense stores only).

    Each head's valid slots are packed to the front in stream order; the array is as
    wide as the largest head, the rest padding. Estimates and ``nbytes`` are unchanged.
    """
    K = np.concatenate([np.asarray(s.keys.dense()) for s in segments], axis=-2)
    Vv = np.concatenate([np.asarray(s.values.dense()) for s in segments], axis=-2)
    nl = np.concatenate([to_numpy(s.num_logw) for s in segments], axis=-1)
    dl = np.concatenate([to_numpy(s.den_logw) for s in segments], axis=-1)
    pos = np.concatenate([s.positions for s in segments], axis=-1)
    valid = np.isfinite(nl) | np.isfinite(dl)
    width = max(int(np.count_nonzero(valid, axis=-1).max()), 1)
    # sort key: valid slots first, by position (ties keep segment order)
    order = np.argsort(np.where(valid, pos, np.iinfo(np.int64).max), axis=-1, kind="stable")[..., :width]
    take = lambda a: np.take_along_axis(a, order, axis=-1)
    return dense_segment(
        gather_tokens(K, order),
        gather_tokens(Vv, order),
        take(nl),
        take(dl),
        np.where(take(valid), take(pos), -1),
        label,
    )
