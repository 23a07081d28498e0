"""How a compressed cache's slots are stored, and what that storage costs.

A :class:`Segment` is a contiguous run of slots: keys, values, two log-weight
arrays and the original position of each slot. A :class:`~balancekv.CompressedKV`
is a list of segments concatenated along the token axis, so that exact tokens,
a compressed middle and a quantized block can sit side by side.

Every array of a segment is of the cache's kind: NumPy (the reference path) or
torch tensors on the caller's device (the fast path) — positions included.

Keys and values are held by a *store*. :class:`DenseStore` keeps the floats
themselves, in the dtype they are held in (the caller's dtype on the torch
path: the model's fp16/bf16 in generation); quantized stores
(:mod:`balancekv.quantized`) keep packed codes, scales and zeros and
dequantize on read.

Accounting convention (stated once, used everywhere): **a cache bills the
bytes it holds.** ``nbytes`` of a store, a segment or a cache is the size of
every array it keeps alive, each storage counted once
(:func:`balancekv._arrays.held_nbytes`): dense entries at their dtype's size,
codes, scales and zeros, the log-weight arrays (a cache whose numerator and
denominator weights are equal, a single-set cache, holds one array for both), positions,
padding slots and spare capacity. ``ratio`` divides by the bytes of the uncompressed cache in the
*same* dtype as the input (``heads * n * (d + s) * itemsize``), so a float64
NumPy cache and a bf16 torch cache of the same tokens report the same ratio
for dense methods; quantized stores, whose codes do not depend on the input
dtype, look smaller against a float64 input than against fp16.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._arrays import Kind, cat, held_nbytes, is_torch, isfinite, take_heads, take_rows, to_numpy, torch

#: Held positions (each slot's index in the input stream, -1 for padding) are int32 on both paths: 4 bytes a
#: slot instead of 8 (a 64-dim fp16 slot is 256 bytes). A stream of more than ``MAX_POSITION`` tokens is
#: refused with a ``ValueError`` (:func:`check_stream_length`), never wrapped around.
POSITION_NP = np.int32
MAX_POSITION = int(np.iinfo(np.int32).max)


def position_dtype(kind_or_array):
    """The position dtype for a :class:`Kind` or an array's kind (``torch.int32`` or ``np.int32``)."""
    tt = kind_or_array.is_torch if isinstance(kind_or_array, Kind) else is_torch(kind_or_array)
    return torch.int32 if tt else POSITION_NP


def as_positions(p, like=None):
    """``p`` as held positions: int32 in ``p``'s kind (torch on its device, or NumPy); ``like`` (a tensor) moves
    NumPy or list input to its device."""
    if is_torch(p):
        return p if p.dtype == torch.int32 else p.to(torch.int32)
    if like is not None and is_torch(like):
        return torch.as_tensor(np.asarray(p), device=like.device).to(torch.int32)
    return np.asarray(p, POSITION_NP)


def check_stream_length(n: int, what: str = "the stream") -> None:
    """Refuse a stream whose positions would not fit the held int32 positions."""
    if int(n) > MAX_POSITION:
        raise ValueError(f"{what} has {int(n)} tokens; positions are held as int32 (at most {MAX_POSITION} tokens)")


xp_cat = cat  # kept for the modules that concatenate stores


class Store:
    """Protocol: ``dense()`` (…, m, f) array in the cache's kind (compute dtype); ``to_kind(kind)``;
    ``reshape_lead(lead)``; ``take(idx)``. Bytes held are found by walking the store's arrays."""

    shape: tuple

    def dense(self):  # pragma: no cover - interface
        raise NotImplementedError

    def nbytes(self) -> int:
        return held_nbytes(self)

    def to_kind(self, kind: Kind) -> Store:  # pragma: no cover - interface
        raise NotImplementedError

    def reshape_lead(self, lead: tuple) -> Store:  # pragma: no cover - interface
        raise NotImplementedError

    def take_heads(self, idx) -> Store:  # pragma: no cover - interface
        """A store of heads ``idx`` only (first axis; copies, so it holds only their bytes)."""
        raise NotImplementedError


@dataclass
class DenseStore(Store):
    """Floats stored as they are (``x`` in its storage dtype); ``dense()`` returns ``x`` itself."""

    x: Any

    @property
    def shape(self):
        return tuple(self.x.shape)

    def dense(self):
        return self.x

    def to_kind(self, kind: Kind) -> DenseStore:
        if kind.is_torch:
            x = self.x if is_torch(self.x) else torch.from_numpy(np.ascontiguousarray(self.x))
            return replace(self, x=x.to(device=kind.device, dtype=kind.dtype))
        if isinstance(self.x, np.ndarray) and self.x.dtype == kind.dtype:
            return self  # already in this kind: no copy
        return replace(self, x=to_numpy(self.x, kind.dtype))

    def reshape_lead(self, lead: tuple) -> DenseStore:
        return replace(self, x=self.x.reshape(tuple(lead) + self.shape[-2:]))

    def take_heads(self, idx) -> DenseStore:
        return DenseStore(take_heads(self.x, idx))


@dataclass
class Segment:
    """A run of slots: key/value stores, log-weights ``(…, m)`` and original positions ``(…, m)``.

    ``positions[i]`` is the index in the input stream of the token stored in slot
    ``i`` (used for causal masking); padding slots hold position -1 and ``-inf``
    weights in both sets. All arrays are of one kind (NumPy, or torch on one device).
    """

    keys: Store
    values: Store
    num_logw: Any
    den_logw: Any
    positions: Any
    label: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def m(self) -> int:
        return self.keys.shape[-2]

    def valid(self):
        """Non-padding slots ``(…, m)`` (bool, the segment's kind)."""
        return isfinite(self.num_logw) | isfinite(self.den_logw)

    def nbytes(self) -> int:
        return held_nbytes(self)

    def to_kind(self, kind: Kind) -> Segment:
        """This segment in ``kind``: keys in ``kind.dtype``, values in ``kind.value_dtype``, weights in the
        compute dtype."""
        if kind.is_torch:
            wdt = kind.compute
            w = lambda a: (a if is_torch(a) else torch.from_numpy(np.ascontiguousarray(a))).to(kind.device, wdt)
            p = lambda a: (a if is_torch(a) else torch.from_numpy(np.ascontiguousarray(a))).to(kind.device, torch.int32)
        else:
            w = lambda a: np.asarray(a, np.float64) if isinstance(a, np.ndarray) else to_numpy(a)
            p = lambda a: np.asarray(a, POSITION_NP) if isinstance(a, np.ndarray) else to_numpy(a, POSITION_NP)
        return replace(
            self,
            keys=self.keys.to_kind(kind),
            values=self.values.to_kind(kind.for_values()),
            num_logw=w(self.num_logw),
            den_logw=w(self.den_logw),
            positions=p(self.positions),
            meta={k: v for k, v in self.meta.items() if k != KEY_ROWS},
        )

    def reshape_lead(self, lead: tuple) -> Segment:
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

    def take_heads(self, idx) -> Segment:
        """The slots of heads ``idx`` only (first axis, the flattened heads; every array copied)."""
        nl = take_heads(self.num_logw, idx)
        return replace(
            self,
            keys=self.keys.take_heads(idx),
            values=self.values.take_heads(idx),
            num_logw=nl,
            den_logw=nl if self.den_logw is self.num_logw else take_heads(self.den_logw, idx),
            positions=take_heads(self.positions, idx),
            meta=dict(self.meta),
        )

    def masked(self, keep_heads) -> Segment:
        """The same segment with every slot of the heads where ``keep_heads`` is False made padding."""
        if is_torch(self.num_logw):
            keep = torch.as_tensor(np.asarray(keep_heads, bool), device=self.num_logw.device)[..., None]
            ninf = torch.tensor(-np.inf, dtype=self.num_logw.dtype, device=self.num_logw.device)
            return replace(
                self,
                num_logw=torch.where(keep, self.num_logw, ninf),
                den_logw=torch.where(keep, self.den_logw, ninf),
                positions=torch.where(keep, self.positions, torch.full_like(self.positions, -1)),
            )
        keep = np.asarray(keep_heads, bool)[..., None]
        return replace(
            self,
            num_logw=np.where(keep, self.num_logw, -np.inf),
            den_logw=np.where(keep, self.den_logw, -np.inf),
            positions=np.where(keep, self.positions, -1),
        )


def dense_segment(K, V, num_logw, den_logw, positions, label: str = "") -> Segment:
    """A segment of dense keys ``K (…, m, d)`` and values ``V (…, m, s)`` (all arrays of one kind)."""
    return Segment(DenseStore(K), DenseStore(V), num_logw, den_logw, as_positions(positions, K), label)


#: ``Segment.meta`` key: the segment's keys are rows ``positions`` of the keys its build was given, bit for bit
#: (set by :func:`input_rows_segment`; dropped by ``to_kind``, whose dtype may round them). A ``compress`` call then
#: scores the segment from the probes' logits over its working keys (``Work``), without a key product of its own.
KEY_ROWS = "key_rows"


def input_rows_segment(K, V, idx, num_logw, den_logw, label: str = "") -> Segment:
    """A dense segment of the tokens ``idx (…, m)`` of ``K`` and ``V``, at those positions (marked
    :data:`KEY_ROWS`)."""
    sg = dense_segment(gather_tokens(K, idx), gather_tokens(V, idx), num_logw, den_logw, idx, label)
    sg.meta[KEY_ROWS] = True
    return sg


def exact_segment(K, V, positions, label: str = "exact", weight_dtype: Any = None) -> Segment:
    """Tokens kept exactly: log-weight 0 in both sets (one zero array serves both: a single-set segment, held
    once). ``positions``: ints broadcastable to ``(…, m)``."""
    shape = tuple(K.shape[:-1])
    if is_torch(K):
        wdt = weight_dtype or (torch.float64 if K.dtype == torch.float64 else torch.float32)
        z = torch.zeros(shape, dtype=wdt, device=K.device)
        pos = as_positions(positions, K).expand(shape).clone()
        return dense_segment(K, V, z, z, pos, label)
    z = np.zeros(shape)
    pos = np.broadcast_to(as_positions(positions), shape).copy()
    return dense_segment(K, V, z, z, pos, label)


def gather_tokens(X, idx):
    """``X[..., idx[..., j], :]`` per leading index: rows ``idx (…, m)`` of ``X (…, n, f)``."""
    return take_rows(X, idx)


def compact_dense(segments: list[Segment], label: str = "") -> Segment:
    """One dense segment holding the valid slots of ``segments`` (dense stores only, either kind).

    Each head's valid slots are packed to the front in stream order; the array is as
    wide as the largest head, the rest padding. Estimates are unchanged. (Mixed-level caches
    no longer use it: they are held ragged, :class:`balancekv.compressed.RaggedKV`; the tests
    build the padded layout with it as the control.)
    """
    K = cat([s.keys.dense() for s in segments], -2)
    Vv = cat([s.values.dense() for s in segments], -2)
    nl = cat([s.num_logw for s in segments], -1)
    dl = cat([s.den_logw for s in segments], -1)
    pos = cat([s.positions for s in segments], -1)
    if is_torch(K):
        valid = torch.isfinite(nl) | torch.isfinite(dl)
        width = max(int(valid.sum(-1).max()), 1)
        big = torch.iinfo(pos.dtype).max
        order = torch.sort(torch.where(valid, pos, torch.full_like(pos, big)), dim=-1, stable=True).indices
        order = order[..., :width]
        take = lambda a: torch.gather(a, -1, order)
        tv = take(valid)
        return dense_segment(
            take_rows(K, order),
            take_rows(Vv, order),
            take(nl),
            take(dl),
            torch.where(tv, take(pos), torch.full_like(order, -1)),
            label,
        )
    valid = np.isfinite(nl) | np.isfinite(dl)
    width = max(int(np.count_nonzero(valid, axis=-1).max()), 1)
    # sort key: valid slots first, by position (ties keep segment order)
    order = np.argsort(np.where(valid, pos, np.iinfo(pos.dtype).max), axis=-1, kind="stable")[..., :width]
    take = lambda a: np.take_along_axis(a, order, axis=-1)
    return dense_segment(
        take_rows(K, order), take_rows(Vv, order), take(nl), take(dl), np.where(take(valid), take(pos), -1), label
    )
