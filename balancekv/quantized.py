"""Quantized storage for a compressed cache and the two decode policies of SPEC section 6.

:class:`QuantStore` holds keys or values as packed ``b``-bit codes plus a scale
and a zero point per group (see :mod:`balancekv.reference.quantization` for the
arithmetic and its bit-exactness contract) and dequantizes on read. Keys are
grouped along tokens, per channel (``axis=-2``); values along channels, per
token (``axis=-1``) [KIVI]. Both paths use the same class: NumPy arrays built by
the reference quantizer, or torch tensors on the caller's device built by
:func:`balancekv.fast.quantization.quantize_pack` (Triton on CUDA, torch on CPU),
bit-identical codes, scales and zeros (SPEC 11). Dequantization is written once
per path: :func:`balancekv.reference.quantization.dequantize` (NumPy) and
:func:`balancekv.fast.quantization.dequantize_packed` (torch; also what the CPU
decode attention uses). No dequantized copy is ever kept: ``dense()`` computes
one on demand, and attention reads the packed words (:func:`store_parts`).

Byte accounting follows :mod:`balancekv.storage`: a cache bills what it holds
(codes, scales, zeros, the full-precision residual buffers, log-weights and
positions, spare capacity included). 2-bit codes with fp16 scale and zero per
group of 16 cost exactly 4 bits per element.

Decode policies (:class:`QuantizedStream`), with residual window ``R``:

- ``"kivi"`` [KIVI, Alg. of the released code]: at prefill the keys of the
  first ``n - n % R`` tokens are quantized and the rest kept in a
  full-precision key buffer, which is flushed (quantized, ``R`` tokens in
  groups of ``G``) whenever it reaches ``R``; the values of all but the last
  ``R`` tokens are quantized, and each decode step quantizes the oldest value
  of the window so that exactly ``R`` values stay full precision.
- ``"kivi-batched"``: ``"kivi"`` with the oldest values quantized ``group`` at a time (``R`` to
  ``R + G - 1`` values stay full precision): the same codes per token, fewer quantizer calls.
- ``"minikv"`` [MINI]: after prefill selection every kept token is quantized
  except the remainder ``m % G``; the keys and values of decode tokens wait in
  full precision and are flushed together in blocks of ``R``.

A per-channel key group is never formed from fewer than ``G`` tokens.

Memory layout of a stream: the quantized codes sit in buffers with spare
capacity (grown by a quarter, at least ``R`` tokens, when full), the
full-precision tokens in a preallocated residual buffer that decode tokens are
written into (compacted to its start when its end is reached, grown to 1.5x
what it holds when it is too small), so an appended token costs amortised O(1)
copies, never a concatenation of the cache. The residual buffers hold the
cache's storage dtype (the caller's dtype; adopted when ``compress`` casts the
segments, see :class:`ResidualStore`), so nothing is held twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from balancekv.reference import quantization as rq

from ._arrays import Kind, compute_dtype, is_torch, take_heads, to_numpy, torch
from .storage import DenseStore, Segment, Store, as_positions, xp_cat

POLICIES = ("kivi", "kivi-batched", "minikv")
SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}


def _scale_np_dtype(scale_dtype) -> np.dtype:
    if isinstance(scale_dtype, str):
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
        return np.dtype(SCALE_DTYPES[scale_dtype])
    return np.dtype(scale_dtype)


def _fq():
    from balancekv.fast import quantization as fq  # noqa: PLC0415  (torch path only)

    return fq


def _zeros_like(x, shape):
    """Zeros of ``shape`` in ``x``'s kind, dtype and device."""
    if is_torch(x):
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    return np.zeros(shape, dtype=x.dtype)


def _grow(x, axis: int, length: int):
    """``x`` with axis ``axis`` enlarged to ``length`` (old entries copied, the rest zero)."""
    shape = list(x.shape)
    old = shape[axis]
    shape[axis] = length
    y = _zeros_like(x, tuple(shape))
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(0, old)
    y[tuple(idx)] = x
    return y


def _capacity(need: int, current: int, step: int) -> int:
    """Geometric growth: a quarter more (at least ``step``), and at least ``need``."""
    return max(need, current + max(current // 4, step))


@dataclass
class QuantStore(Store):
    """Packed ``b``-bit codes + scales + zeros of ``m`` tokens ``(…, m, f)``; dequantized on read.

    ``axis=-2`` (keys): groups of ``group`` tokens per channel, ``packed (…, f, W)`` with
    ``W >= ceil(m b/32)``, ``scale, zero (…, >= m/group, f)``. ``axis=-1`` (values): groups of
    ``group`` channels per token, ``packed (…, >= m, ceil(f b/32))``, ``scale, zero
    (…, >= m, f/group)``. The buffers may be longer than ``m`` tokens (spare capacity of a
    decode stream); only the first ``m`` are read. NumPy arrays, or torch tensors on the cache's
    device (``packed`` int32, scales in ``scale_dtype``). ``dense()`` returns ``dense_dtype``
    (float64 for NumPy; for torch the compute dtype as built, the cache's storage dtype after
    :meth:`to_kind`), computed in float64 for float64 and float32 otherwise.
    """

    packed: Any
    scale: Any
    zero: Any
    bits: int
    group: int
    axis: int
    m: int
    f: int
    dense_dtype: Any = np.float64

    # ------------------------------------------------------------ construction
    @classmethod
    def quantize(cls, x, bits: int, group: int, axis: int, scale_dtype=np.float16, backend: str = "auto") -> QuantStore:
        """Quantize ``x (…, m, f)`` and pack its codes: the reference for NumPy, ``quantize_pack`` for torch."""
        if axis not in (-2, -1):
            raise ValueError(f"axis must be -2 (keys: per channel along tokens) or -1 (values), got {axis}")
        sdt = _scale_np_dtype(scale_dtype)
        if is_torch(x):
            packed, scale, zero = _fq().quantize_pack(x, bits, group, axis, sdt, backend=backend)
            ddt = compute_dtype(x.dtype)
        else:
            x = np.asarray(x)
            codes, scale, zero = rq.quantize(x, bits, group, axis, sdt)
            packed, ddt = rq.pack(codes, bits, axis), np.float64
        return cls(packed, scale, zero, int(bits), int(group), int(axis), int(x.shape[-2]), int(x.shape[-1]), ddt)

    @property
    def lead(self) -> tuple:
        return tuple(self.scale.shape[:-2])

    @property
    def shape(self):
        return self.lead + (self.m, self.f)

    @property
    def capacity(self) -> int:
        """Tokens the buffers can hold."""
        if self.axis == -1:
            return int(self.packed.shape[-2])
        return min(int(self.packed.shape[-1]) * (32 // self.bits), int(self.scale.shape[-2]) * self.group)

    # ------------------------------------------------------------ reading
    def codes(self):
        """The unpacked uint8 codes ``(…, m, f)`` (the store's kind)."""
        if is_torch(self.packed):
            fq = _fq()
            if self.axis == -2:
                return fq.unpack(self.packed, self.bits, -2, self.m)
            return fq.unpack(self.packed[..., : self.m, :], self.bits, -1, self.f)
        if self.axis == -2:
            return rq.unpack(self.packed, self.bits, -2, self.m)
        return rq.unpack(self.packed[..., : self.m, :], self.bits, -1, self.f)

    def dense(self):
        if not is_torch(self.packed):
            ng = self.m // self.group if self.axis == -2 else self.m
            sc, ze = self.scale[..., :ng, :], self.zero[..., :ng, :]
            return rq.dequantize(self.codes(), sc, ze, self.group, self.axis)
        lead = self.lead
        L = int(np.prod(lead, dtype=np.int64)) if lead else 1
        r = lambda a: a.reshape((L,) + tuple(a.shape[-2:]))
        out = _fq().dequantize_packed(
            r(self.packed),
            r(self.scale),
            r(self.zero),
            self.bits,
            self.group,
            "tokens" if self.axis == -2 else "channels",
            self.f,
            0,
            self.m,
            compute_dtype(self.dense_dtype),
        )
        return out.reshape(lead + (self.m, self.f)).to(self.dense_dtype)

    # ------------------------------------------------------------ growing (decode streams)
    def extended(self, x, scale_dtype, backend: str = "auto", step: int = 1) -> QuantStore:
        """This store followed by the quantized tokens ``x (…, t, f)`` (for keys ``t`` a multiple of
        ``group`` and ``m`` too). Written into the spare capacity in place (the first ``m`` tokens,
        which earlier snapshots of this store read, are not changed), or into buffers grown by a
        quarter (at least ``step`` tokens)."""
        new = QuantStore.quantize(x, self.bits, self.group, self.axis, scale_dtype, backend)
        t, m = new.m, self.m
        packed, scale, zero = self.packed, self.scale, self.zero
        if m + t > self.capacity:
            cap = _capacity(m + t, self.capacity, step)
            if self.axis == -1:
                packed, scale, zero = _grow(packed, -2, cap), _grow(scale, -2, cap), _grow(zero, -2, cap)
            else:
                cap = -(-cap // self.group) * self.group
                per = 32 // self.bits
                packed = _grow(packed, -1, -(-cap // per))
                scale, zero = _grow(scale, -2, cap // self.group), _grow(zero, -2, cap // self.group)
        if self.axis == -1:
            packed[..., m : m + t, :] = new.packed
            scale[..., m : m + t, :] = new.scale
            zero[..., m : m + t, :] = new.zero
        else:
            per = 32 // self.bits
            w0, r = m // per, m % per
            words = new.packed
            if r:  # the new codes start inside a word: repack that word's first r codes with them
                words = self._repack_tail(packed[..., w0 : w0 + 1], r, words, t)
            packed[..., w0 : w0 + words.shape[-1]] = words
            g0 = m // self.group
            scale[..., g0 : g0 + t // self.group, :] = new.scale
            zero[..., g0 : g0 + t // self.group, :] = new.zero
        return replace(self, packed=packed, scale=scale, zero=zero, m=m + t)

    def _repack_tail(self, word, r, words, t):
        if is_torch(word):
            fq = _fq()
            codes = torch.cat([fq.unpack(word, self.bits, -1, r), fq.unpack(words, self.bits, -1, t)], dim=-1)
            return fq.pack(codes, self.bits, -1)
        codes = np.concatenate([rq.unpack(word, self.bits, -1, r), rq.unpack(words, self.bits, -1, t)], axis=-1)
        return rq.pack(codes, self.bits, -1)

    # ------------------------------------------------------------ conversions
    def to_kind(self, kind: Kind) -> QuantStore:
        if kind.is_torch:
            to_t = lambda a: (
                a.to(kind.device) if is_torch(a) else torch.from_numpy(np.ascontiguousarray(a)).to(kind.device)
            )
            return replace(
                self, packed=to_t(self.packed), scale=to_t(self.scale), zero=to_t(self.zero), dense_dtype=kind.dtype
            )
        if not is_torch(self.packed):
            return self
        to_n = lambda a: a.cpu().numpy()
        return replace(
            self, packed=to_n(self.packed), scale=to_n(self.scale), zero=to_n(self.zero), dense_dtype=np.float64
        )

    def reshape_lead(self, lead: tuple) -> QuantStore:
        lead = tuple(lead)
        r = lambda a: a.reshape(lead + tuple(a.shape[-2:]))
        return replace(self, packed=r(self.packed), scale=r(self.scale), zero=r(self.zero))

    def take_heads(self, idx) -> QuantStore:
        """The codes, scales and zeros of heads ``idx`` only (copied; spare capacity kept)."""
        t = lambda a: take_heads(a, idx)
        return replace(self, packed=t(self.packed), scale=t(self.scale), zero=t(self.zero))


@dataclass
class TokenConcatStore(Store):
    """Stores covering consecutive runs of slots, read as one ``(…, m, f)`` array."""

    parts: list

    @property
    def shape(self):
        s0 = self.parts[0].shape
        return tuple(s0[:-2]) + (sum(p.shape[-2] for p in self.parts), s0[-1])

    def dense(self):
        xs = [p.dense() for p in self.parts]
        if is_torch(xs[0]):
            dt = xs[0].dtype
            for x in xs[1:]:
                dt = torch.promote_types(dt, x.dtype)
            xs = [x.to(dt) for x in xs]
        return xp_cat(xs, axis=-2)

    def to_kind(self, kind: Kind) -> TokenConcatStore:
        return TokenConcatStore([p.to_kind(kind) for p in self.parts])

    def reshape_lead(self, lead: tuple) -> TokenConcatStore:
        return TokenConcatStore([p.reshape_lead(lead) for p in self.parts])

    def take_heads(self, idx) -> TokenConcatStore:
        return TokenConcatStore([p.take_heads(idx) for p in self.parts])


def concat_stores(parts: list) -> Store:
    parts = [p for p in parts if p is not None and p.shape[-2] > 0]
    return parts[0] if len(parts) == 1 else TokenConcatStore(parts)


# ---------------------------------------------------------------------------- full-precision buffers
class Residual:
    """Full-precision tokens ``(H, len, f)`` of a stream in a buffer with spare room.

    Tokens live in ``buf[:, a:b]``; :meth:`push` writes after them (moving them to the start of
    the buffer when its end is reached, or into a buffer 1.5x as large when it is too small),
    :meth:`pop` hands out the oldest ones (to be quantized at once). ``version`` changes whenever
    the live region moves, so a :class:`ResidualStore` knows whether it still views it.
    """

    def __init__(self, x, step: int = 16):
        self.buf = x.clone() if is_torch(x) else np.array(x, copy=True)
        self.a, self.b = 0, int(x.shape[-2])
        self.step = int(step)
        self.version = 0

    def __len__(self) -> int:
        return self.b - self.a

    def view(self):
        return self.buf[..., self.a : self.b, :]

    def push(self, x) -> None:
        t = int(x.shape[-2])
        if self.b + t > self.buf.shape[-2]:
            live = len(self) + t
            want = live + max(self.step, live // 2)
            if self.buf.shape[-2] >= want:  # room enough: move the live tokens to the start
                y = self.buf
                y[..., : len(self), :] = self.view().clone() if is_torch(y) else self.view().copy()
            else:
                y = _zeros_like(self.buf, tuple(self.buf.shape[:-2]) + (want, self.buf.shape[-1]))
                y[..., : len(self), :] = self.view()
            self.buf, self.a, self.b = y, 0, len(self)
            self.version += 1
        self.buf[..., self.b : self.b + t, :] = x
        self.b += t
        self.version += 1

    def pop(self, j: int):
        """The oldest ``j`` tokens (a view, valid until the next :meth:`push`), removed from the buffer."""
        out = self.buf[..., self.a : self.a + j, :]
        self.a += j
        self.version += 1
        return out

    def take_heads(self, idx) -> Residual:
        """A residual of heads ``idx`` only (its buffer copied, spare room kept)."""
        out = copy.copy(self)
        out.buf = take_heads(self.buf, idx)
        return out

    def adopt(self, kind: Kind) -> None:
        """Hold the tokens in ``kind``'s storage dtype and device (once; lossless for the caller's data)."""
        x = self.buf
        if kind.is_torch:
            x = x if is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))
            if x.dtype != kind.dtype or x.device != kind.device:
                x = x.to(device=kind.device, dtype=kind.dtype)
        elif is_torch(x) or x.dtype != np.dtype(kind.dtype):
            x = to_numpy(x, kind.dtype)
        if x is not self.buf:
            self.buf = x
            self.version += 1


@dataclass
class ResidualStore(DenseStore):
    """A dense view of a stream's :class:`Residual`. ``to_kind`` makes the stream hold its tokens in
    the target dtype and returns a view of them: casting the segments (as ``compress`` does) never
    leaves a second copy. A snapshot whose residual has changed since converts like a DenseStore."""

    owner: Any = None
    version: int = -1

    def to_kind(self, kind: Kind) -> DenseStore:
        if self.owner is None or self.owner.version != self.version:
            return DenseStore(self.x).to_kind(kind)
        self.owner.adopt(kind)
        return replace(self, x=self.owner.view().reshape(self.x.shape), version=self.owner.version)


class Slots:
    """A growing per-head array ``(H, m)`` (log-weights or positions) with spare capacity."""

    def __init__(self, x, step: int = 16):
        self.buf = x.clone() if is_torch(x) else np.array(x, copy=True)
        self.m = int(x.shape[-1])
        self.step = int(step)

    def __len__(self) -> int:
        return self.m

    def view(self):
        return self.buf[..., : self.m]

    def take_heads(self, idx) -> Slots:
        out = copy.copy(self)
        out.buf = take_heads(self.buf, idx)
        return out

    def push(self, x) -> None:
        t = int(x.shape[-1])
        if self.m + t > self.buf.shape[-1]:
            self.buf = _grow(self.buf, -1, _capacity(self.m + t, self.buf.shape[-1], self.step))
        self.buf[..., self.m : self.m + t] = x
        self.m += t


def check_policy_options(bits, group, residual, policy, scale_dtype) -> None:
    """``ValueError``/``TypeError`` naming the offending option."""
    if isinstance(bits, bool) or bits not in rq.BITS:
        raise ValueError(f"option bits must be one of {rq.BITS}, got {bits!r}")
    for name, v in (("group", group), ("residual", residual)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"option {name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"option {name} must be >= 1, got {v}")
    if residual % group:
        raise ValueError(
            f"option residual={residual} must be a multiple of group={group} "
            "(key groups are formed from whole flushed blocks)"
        )
    if policy not in POLICIES:
        raise ValueError(f"option policy must be one of {POLICIES}, got {policy!r}")
    _scale_np_dtype(scale_dtype)


class QuantizedStream:
    """Decode-time state of a quantized cache (policies ``"kivi"``, ``"kivi-batched"``, ``"minikv"``), either path.

    Holds, per head ``(H, …)``, the stored tokens in stream order: a quantized key prefix of
    ``nk`` tokens (``nk`` a multiple of ``group``), a quantized value prefix of ``nv`` tokens,
    and full-precision residual buffers for the rest.

    Policies (SPEC 6): ``"kivi"`` ([KIVI]) quantizes keys per channel in blocks of ``R`` tokens (the key
    residual holds fewer than ``R``) and values per token, the value window exactly ``R``: the oldest value is
    quantized at every decode step. ``"kivi-batched"`` is the same except that the oldest values are quantized
    ``group`` at a time, when the value residual reaches ``R + group`` (it holds ``R`` to ``R + group - 1``): the
    codes of a token are the same (values are quantized per token), a token just stays in full precision for up
    to ``group - 1`` more steps, billed in ``nbytes``. It exists for speed (issue 11): the quantizer's fixed cost
    of one call per layer per step was about 0.3 ms of a SmolLM2 layer's decode step on the 2-core CPU.
    ``"minikv"``: keys and values alike, in blocks of ``R`` tokens.

    ``logw`` (one log-weight per slot, the same in numerator and denominator) lets a weighted token set
    (BalanceKV's kept tokens) be stored this way; decode tokens get weight 1 (log-weight 0). ``K``, ``V``,
    ``positions``, ``logw`` are NumPy (reference path) or torch tensors on one device (torch path, compute
    dtype); the stream's arrays are of the same kind. The segments it returns share its
    buffers (nothing is copied per step).
    """

    #: after :meth:`to_kind` its segments are in the cache's kind as they are (codes on the device, residuals in
    #: the storage dtypes, log-weights in the compute dtype, positions int32): a decode step converts nothing, and
    #: reads its attention parts from :meth:`flat_parts` (what an in-kind stream provides)
    segments_in_kind = True

    def __init__(
        self,
        K,
        V,
        positions,
        logw=None,
        *,
        bits: int = 2,
        group: int = 32,
        residual: int = 128,
        policy: str = "kivi",
        scale_dtype="float16",
        label: str = "quantized",
        backend: str = "auto",
    ):
        check_policy_options(bits, group, residual, policy, scale_dtype)
        H, n, d = K.shape
        s = V.shape[-1]
        if s % group:
            raise ValueError(
                f"option group={group} must divide the value dimension s={s} "
                "(values are quantized per token in groups of channels)"
            )
        self.bits, self.group, self.R, self.policy = int(bits), int(group), int(residual), policy
        self.sdt = _scale_np_dtype(scale_dtype)
        self.label, self.backend = label, backend
        t = is_torch(K)
        if t:
            pos = as_positions(positions, K).expand(H, n)
            lw = torch.zeros((H, n), dtype=K.dtype, device=K.device) if logw is None else logw.to(K.dtype)
        else:
            pos = np.broadcast_to(as_positions(positions), (H, n))
            lw = np.zeros((H, n)) if logw is None else np.asarray(logw, np.float64)
        self.pos, self.logw = Slots(pos, self.R), Slots(lw, self.R)
        if policy != "minikv":
            nk, nv = (n // self.R) * self.R, max(0, n - self.R)
        else:
            nk = nv = n - n % self.group
        self.kq = self._quantize(K[:, :nk], -2) if nk else None
        self.vq = self._quantize(V[:, :nv], -1) if nv else None
        self.kres, self.vres = Residual(K[:, nk:], self.group), Residual(V[:, nv:], self.group)

    def _quantize(self, x, axis):
        try:
            return QuantStore.quantize(x, self.bits, self.group, axis, self.sdt, self.backend)
        except ValueError as e:  # name what the caller passed, not the quantizer's argument
            if "beyond the range of scale_dtype" not in str(e):
                raise
            what = "keys" if axis == -2 else "values"
            raise ValueError(
                f"the {what} have entries of magnitude above {float(np.finfo(self.sdt).max):g}, beyond the range "
                f"of the option scale_dtype={self.sdt.name!r}; pass scale_dtype='float32'"
            ) from None

    # ------------------------------------------------------------ moving tokens into low bits
    def _quantize_keys(self, t: int) -> None:
        """Quantize the oldest ``t`` full-precision keys (``t`` a multiple of ``group``)."""
        if t <= 0:
            return
        assert t % self.group == 0, "a per-channel key group needs group tokens"
        x = self.kres.pop(t)
        self.kq = self._quantize(x, -2) if self.kq is None else self.kq.extended(x, self.sdt, self.backend, self.R)

    def _quantize_values(self, t: int) -> None:
        if t <= 0:
            return
        x = self.vres.pop(t)
        self.vq = self._quantize(x, -1) if self.vq is None else self.vq.extended(x, self.sdt, self.backend, self.R)

    @property
    def nk(self) -> int:
        return 0 if self.kq is None else self.kq.m

    @property
    def nv(self) -> int:
        return 0 if self.vq is None else self.vq.m

    @property
    def n(self) -> int:
        """Tokens held (every token given or appended)."""
        return len(self.pos)

    # ------------------------------------------------------------ the stream protocol
    def to_kind(self, kind: Kind) -> None:
        """Hold the state in the cache's kind once (``compress`` calls it after the build): residual keys in
        ``kind.dtype``, residual values in the values' dtype, codes on ``kind``'s device."""
        self.kres.adopt(kind)
        self.vres.adopt(kind.for_values())
        if self.kq is not None:
            self.kq = self.kq.to_kind(kind)
        if self.vq is not None:
            self.vq = self.vq.to_kind(kind.for_values())

    def take_heads(self, idx) -> QuantizedStream:
        """The stream of heads ``idx`` only (every buffer copied: it holds only their codes and residuals), for a
        cache whose heads chose different levels (:func:`balancekv.api._combine`). ``self`` is unchanged."""
        out = copy.copy(self)
        out.pos, out.logw = self.pos.take_heads(idx), self.logw.take_heads(idx)
        out.kq = None if self.kq is None else self.kq.take_heads(idx)
        out.vq = None if self.vq is None else self.vq.take_heads(idx)
        out.kres, out.vres = self.kres.take_heads(idx), self.vres.take_heads(idx)
        return out

    def _residual_store(self, res: Residual) -> ResidualStore:
        return ResidualStore(res.view(), owner=res, version=res.version)

    def segments(self) -> list[Segment]:
        H = self.pos.buf.shape[0]
        if self.n == 0:
            return []
        keys = concat_stores([self.kq, self._residual_store(self.kres)])
        values = concat_stores([self.vq, self._residual_store(self.vres)])
        lw = self.logw.view()
        return [
            Segment(
                keys,
                values,
                lw,
                lw,
                self.pos.view(),
                self.label,
                meta={
                    "policy": self.policy,
                    "bits": self.bits,
                    "group": self.group,
                    "residual": self.R,
                    "quantized_keys": self.nk,
                    "quantized_values": self.nv,
                    "heads": H,
                },
            )
        ]

    def flat_parts(self) -> list:
        """The stream as :func:`balancekv.fast.attend_parts` parts ``(H, …)`` (torch streams): the parts
        :func:`store_parts` cuts from :meth:`segments`, made directly from the buffers (a decode step asks for them
        every step; the segments' generic cutting cost about 0.15 ms a layer). Cut where the key or the value
        store changes representation: ``[0, min(nk, nv))`` codes both, then one side's codes and the other's
        residual, then both residuals."""
        n, nk, nv = self.n, self.nk, self.nv
        H = self.pos.buf.shape[0]
        lw, pos = self.logw.view(), self.pos.view()
        kres, vres = self.kres.view(), self.vres.view()
        cuts = sorted({0, nk, nv, n})
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            K = _slice_store(self.kq, a, b, "keys", H) if a < nk else kres[:, a - nk : b - nk]
            V = _slice_store(self.vq, a, b, "values", H) if a < nv else vres[:, a - nv : b - nv]
            w = lw[:, a:b]
            parts.append((K, V, w, w, pos[:, a:b]))
        return parts

    def append(self, k, v, pos) -> list[Segment]:
        """:meth:`push`, then the segments."""
        self.push(k, v, pos)
        return self.segments()

    def push(self, k, v, pos) -> None:
        """Add decode tokens ``k (H, t, d)``, ``v (H, t, s)`` at stream positions ``pos (t,)``.

        Processed in chunks of at most ``R`` tokens, so the residual buffers never hold more than
        ``2R + group`` tokens; each chunk is written into them and flushed per the policy.
        """
        H, t = k.shape[0], int(k.shape[-2])
        R = self.R
        for c0 in range(0, t, R):
            c1 = min(t, c0 + R)
            kc, vc, pc = k[:, c0:c1], v[:, c0:c1], pos[c0:c1]
            self.kres.push(kc)
            self.vres.push(vc)
            if is_torch(kc):
                self.pos.push(as_positions(pc, kc).expand(H, c1 - c0))
                self.logw.push(torch.zeros((H, c1 - c0), dtype=self.logw.buf.dtype, device=kc.device))
            else:
                self.pos.push(np.broadcast_to(as_positions(pc), (H, c1 - c0)))
                self.logw.push(np.zeros((H, c1 - c0)))
            if self.policy != "minikv":
                while len(self.kres) >= R:
                    self._quantize_keys(R)
                over = len(self.vres) - R
                if self.policy == "kivi":
                    self._quantize_values(over)
                elif over >= self.group:  # kivi-batched: the oldest values, a multiple of group at once
                    self._quantize_values(over - over % self.group)
            else:
                while len(self.kres) >= R:
                    self._quantize_keys(R)
                    self._quantize_values(R)


def quantize_segments_dense(K, V, positions, logw, **policy_options) -> tuple[list[Segment], QuantizedStream]:
    """Store a weighted token set ``(H, m, ·)`` with a :class:`QuantizedStream`; returns its segments and stream."""
    stream = QuantizedStream(K, V, positions, logw, **policy_options)
    return stream.segments(), stream


# ---------------------------------------------------------------------------- attention parts
def _store_pieces(store):
    """``[(start, stop, store)]``: the runs of slots of a (possibly concatenated) store."""
    pieces = store.parts if isinstance(store, TokenConcatStore) else [store]
    out, a = [], 0
    for p in pieces:
        m = p.shape[-2]
        out.append((a, a + m, p))
        a += m
    return out


def _slice_store(piece, a: int, b: int, role: str, L: int):
    """Slots ``[a, b)`` (local to the piece) as a dense ``(L, b-a, f)`` tensor or a ``Packed``.

    Packed keys pass their whole buffers with an offset; packed values starting at slot 0 pass
    their whole buffers too (the kernel reads the first ``b`` rows): no copy per call."""
    from balancekv.fast.decode_attention import Packed  # noqa: PLC0415  (torch path only)

    if isinstance(piece, QuantStore):
        f = piece.f
        if role == "keys" and piece.axis == -2:
            words = piece.packed.reshape(L, f, -1)
            sc, ze = piece.scale.reshape(L, -1, f), piece.zero.reshape(L, -1, f)
            return Packed(words, sc, ze, piece.bits, piece.group, "tokens", b - a, f, offset=a)
        if role == "values" and piece.axis == -1:
            rows = piece.packed.shape[-2]
            words = piece.packed.reshape(L, rows, -1)[:, a:]
            sc = piece.scale.reshape(L, rows, -1)[:, a:]
            ze = piece.zero.reshape(L, rows, -1)[:, a:]
            if a:  # a part starting mid-store: its own rows only
                words, sc, ze = words[:, : b - a], sc[:, : b - a], ze[:, : b - a]
            return Packed(words, sc, ze, piece.bits, piece.group, "channels", b - a, f)
    x = piece.dense()
    return x.reshape((L,) + tuple(x.shape[-2:]))[:, a:b]


def store_parts(seg: Segment, L: int) -> list:
    """A torch segment as parts for :func:`balancekv.fast.attend_parts` (flattened heads ``L``).

    The segment is cut where its key store or its value store changes representation (packed
    codes vs dense floats), so every part is uniform for the kernel; codes stay packed.
    """
    m = seg.m
    if m == 0:
        return []
    kp, vp = _store_pieces(seg.keys), _store_pieces(seg.values)
    cuts = sorted({0, m} | {a for a, _, _ in kp} | {a for a, _, _ in vp})
    nl, dl, pos = seg.num_logw.reshape(L, m), seg.den_logw.reshape(L, m), seg.positions.reshape(L, m)
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b <= a:
            continue
        ka, _, kpiece = next(p for p in kp if p[0] <= a < p[1])
        va, _, vpiece = next(p for p in vp if p[0] <= a < p[1])
        K = _slice_store(kpiece, a - ka, b - ka, "keys", L)
        Vv = _slice_store(vpiece, a - va, b - va, "values", L)
        parts.append((K, Vv, nl[:, a:b], dl[:, a:b], pos[:, a:b]))
    return parts
