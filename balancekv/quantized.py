"""Quantized storage for a compressed cache and the two decode policies of SPEC section 6.

:class:`QuantStore` holds keys or values as packed ``b``-bit codes plus a scale
and a zero point per group (see :mod:`balancekv.reference.quantization` for the
arithmetic and its bit-exactness contract) and dequantizes on read. Keys are
grouped along tokens, per channel (``axis=-2``); values along channels, per
token (``axis=-1``) [KIVI].

Byte accounting (``nbytes``), counted to the byte:

- codes: ``b`` bits per stored element of a valid slot; for keys the codes of
  one head are counted together and rounded up to a whole byte, for values
  each token's codes are rounded up to a whole byte;
- scales and zeros: ``2 * bytes(scale_dtype)`` per group that holds at least
  one valid slot (for keys: per channel and token group; for values: per token
  and channel group).

So 2-bit codes with fp16 scale and zero per group of 16 cost exactly 4 bits
per element. Padding slots and the padding codes of a partly filled int32
word are not billed, in line with :mod:`balancekv.storage`.

Decode policies (:class:`QuantizedStream`), with residual window ``R``:

- ``"kivi"`` [KIVI, Alg. of the released code]: at prefill the keys of the
  first ``n - n % R`` tokens are quantized and the rest kept in a
  full-precision key buffer, which is flushed (quantized, ``R`` tokens in
  groups of ``G``) whenever it reaches ``R``; the values of all but the last
  ``R`` tokens are quantized, and each decode step quantizes the oldest value
  of the window so that exactly ``R`` values stay full precision.
- ``"minikv"`` [MINI]: after prefill selection every kept token is quantized
  except the remainder ``m % G``; the keys and values of decode tokens wait in
  full precision and are flushed together in blocks of ``R``.

A per-channel key group is never formed from fewer than ``G`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from balancekv.reference import quantization as rq

from ._arrays import Kind, is_torch, to_numpy, torch
from .storage import DenseStore, Segment, Store, xp_cat

POLICIES = ("kivi", "minikv")
SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}


def _scale_np_dtype(scale_dtype) -> np.dtype:
    if isinstance(scale_dtype, str):
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
        return np.dtype(SCALE_DTYPES[scale_dtype])
    return np.dtype(scale_dtype)


@dataclass
class QuantStore(Store):
    """Packed ``b``-bit codes + scales + zeros of an array ``(…, m, f)``; dequantized on read.

    ``axis=-2`` (keys): groups of ``group`` tokens per channel, ``packed (…, f, ceil(m b/32))``,
    ``scale, zero (…, m/group, f)``. ``axis=-1`` (values): groups of ``group`` channels per token,
    ``packed (…, m, ceil(f b/32))``, ``scale, zero (…, m, f/group)``. Arrays are NumPy, or torch
    tensors on the cache's device (``packed`` int32, scales in ``scale_dtype``) after
    :meth:`to_kind`. ``dense()`` returns float64 for NumPy; for torch, the kind's dtype,
    computed in float64 (CPU or float64 kinds) or float32.
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
    def quantize(cls, x: np.ndarray, bits: int, group: int, axis: int, scale_dtype=np.float16) -> "QuantStore":
        """Quantize a NumPy array ``x (…, m, f)`` (reference arithmetic) and pack its codes."""
        if axis not in (-2, -1):
            raise ValueError(f"axis must be -2 (keys: per channel along tokens) or -1 (values), got {axis}")
        x = np.asarray(x)
        codes, scale, zero = rq.quantize(x, bits, group, axis, _scale_np_dtype(scale_dtype))
        return cls(
            rq.pack(codes, bits, axis),
            scale,
            zero,
            int(bits),
            int(group),
            int(axis),
            int(x.shape[-2]),
            int(x.shape[-1]),
        )

    @property
    def lead(self) -> tuple:
        return tuple(self.scale.shape[:-2])

    @property
    def shape(self):
        return self.lead + (self.m, self.f)

    @property
    def scale_bytes(self) -> int:
        return int(self.scale.element_size()) if is_torch(self.scale) else int(np.dtype(self.scale.dtype).itemsize)

    # ------------------------------------------------------------ reading
    def codes(self) -> np.ndarray:
        """The unpacked uint8 codes ``(…, m, f)`` (NumPy)."""
        packed = self.packed.cpu().numpy() if is_torch(self.packed) else self.packed
        length = self.m if self.axis == -2 else self.f
        return rq.unpack(packed, self.bits, self.axis, length)

    def dense(self):
        if not is_torch(self.packed):
            return rq.dequantize(self.codes(), self.scale, self.zero, self.group, self.axis)
        per = 32 // self.bits
        shifts = torch.arange(per, device=self.packed.device, dtype=torch.int32) * self.bits
        c = (self.packed[..., None] >> shifts) & (2**self.bits - 1)
        length = self.m if self.axis == -2 else self.f
        c = c.reshape(*self.packed.shape[:-1], -1)[..., :length]
        if self.axis == -2:
            c = c.transpose(-1, -2)
        cdt = (
            torch.float64 if (self.dense_dtype == torch.float64 or self.packed.device.type == "cpu") else torch.float32
        )
        s = torch.repeat_interleave(self.scale.to(cdt), self.group, dim=self.axis)
        z = torch.repeat_interleave(self.zero.to(cdt), self.group, dim=self.axis)
        return (c.to(cdt) * s + z).to(self.dense_dtype)

    # ------------------------------------------------------------ accounting
    def nbytes(self, valid: np.ndarray) -> int:
        valid = np.broadcast_to(np.asarray(valid, bool), self.lead + (self.m,))
        sb = 2 * self.scale_bytes
        if self.axis == -2:
            per_head = np.count_nonzero(valid, axis=-1).reshape(-1)
            code_bytes = sum(rq.packed_nbytes(int(c) * self.f, self.bits) for c in per_head)
            groups = valid.reshape(self.lead + (self.m // self.group, self.group)).any(axis=-1)
            return int(code_bytes + np.count_nonzero(groups) * self.f * sb)
        tokens = int(np.count_nonzero(valid))
        return int(tokens * (rq.packed_nbytes(self.f, self.bits) + (self.f // self.group) * sb))

    # ------------------------------------------------------------ conversions
    def to_kind(self, kind: Kind) -> "QuantStore":
        if kind.is_torch:
            to_t = lambda a: (
                a.to(kind.device) if is_torch(a) else torch.from_numpy(np.ascontiguousarray(a)).to(kind.device)
            )
            return replace(
                self, packed=to_t(self.packed), scale=to_t(self.scale), zero=to_t(self.zero), dense_dtype=kind.dtype
            )
        to_n = lambda a: a.cpu().numpy() if is_torch(a) else a
        return replace(
            self, packed=to_n(self.packed), scale=to_n(self.scale), zero=to_n(self.zero), dense_dtype=np.float64
        )

    def reshape_lead(self, lead: tuple) -> "QuantStore":
        lead = tuple(lead)
        r = lambda a: a.reshape(lead + tuple(a.shape[-2:]))
        return replace(self, packed=r(self.packed), scale=r(self.scale), zero=r(self.zero))

    def concat_tokens(self, other: "QuantStore") -> "QuantStore":
        """This store followed by ``other`` along the token axis (NumPy stores, same format)."""
        if (self.bits, self.group, self.axis, self.f) != (other.bits, other.group, other.axis, other.f):
            raise ValueError("can only concatenate quantized stores of the same format")
        if self.axis == -1:
            packed = np.concatenate([self.packed, other.packed], axis=-2)
        elif (self.m * self.bits) % 32 == 0:  # whole words: the packed words simply follow each other
            packed = np.concatenate([self.packed, other.packed], axis=-1)
        else:
            packed = rq.pack(np.concatenate([self.codes(), other.codes()], axis=-2), self.bits, -2)
        return replace(
            self,
            packed=packed,
            scale=np.concatenate([self.scale, other.scale], axis=-2),
            zero=np.concatenate([self.zero, other.zero], axis=-2),
            m=self.m + other.m,
        )


@dataclass
class TokenConcatStore(Store):
    """Stores covering consecutive runs of slots, read as one ``(…, m, f)`` array."""

    parts: list

    @property
    def shape(self):
        s0 = self.parts[0].shape
        return tuple(s0[:-2]) + (sum(p.shape[-2] for p in self.parts), s0[-1])

    def dense(self):
        return xp_cat([p.dense() for p in self.parts], axis=-2)

    def nbytes(self, valid: np.ndarray) -> int:
        total, a = 0, 0
        for p in self.parts:
            b = a + p.shape[-2]
            total += p.nbytes(valid[..., a:b])
            a = b
        return int(total)

    def to_kind(self, kind: Kind) -> "TokenConcatStore":
        return TokenConcatStore([p.to_kind(kind) for p in self.parts])

    def reshape_lead(self, lead: tuple) -> "TokenConcatStore":
        return TokenConcatStore([p.reshape_lead(lead) for p in self.parts])


def concat_stores(parts: list) -> Store:
    parts = [p for p in parts if p is not None and p.shape[-2] > 0]
    return parts[0] if len(parts) == 1 else TokenConcatStore(parts)


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
    """Decode-time state of a quantized cache (policies ``"kivi"`` and ``"minikv"``).

    Holds, per head ``(H, …)``, the stored tokens in stream order: a quantized key prefix of
    ``nk`` tokens (``nk`` a multiple of ``group``), a quantized value prefix of ``nv`` tokens,
    and full-precision buffers for the rest. ``logw`` (one log-weight per slot, the same in
    numerator and denominator) lets a weighted token set (BalanceKV's kept tokens) be stored
    this way; decode tokens get weight 1 (log-weight 0).
    """

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
        self.label = label
        self.kq = self.vq = None
        self.kf, self.vf = np.array(K, np.float64), np.array(V, np.float64)
        self.pos = np.broadcast_to(np.asarray(positions, np.int64), (H, n)).copy()
        self.logw = np.zeros((H, n)) if logw is None else np.array(logw, np.float64)
        if policy == "kivi":
            self._quantize_keys((n // self.R) * self.R)
            self._quantize_values(max(0, n - self.R))
        else:
            r = n - n % self.group
            self._quantize_keys(r)
            self._quantize_values(r)

    # ------------------------------------------------------------ moving tokens into low bits
    def _quantize_keys(self, t: int) -> None:
        """Quantize the oldest ``t`` full-precision keys (``t`` a multiple of ``group``)."""
        if t <= 0:
            return
        assert t % self.group == 0, "a per-channel key group needs group tokens"
        new = QuantStore.quantize(self.kf[:, :t], self.bits, self.group, -2, self.sdt)
        self.kq = new if self.kq is None else self.kq.concat_tokens(new)
        self.kf = self.kf[:, t:]

    def _quantize_values(self, t: int) -> None:
        if t <= 0:
            return
        new = QuantStore.quantize(self.vf[:, :t], self.bits, self.group, -1, self.sdt)
        self.vq = new if self.vq is None else self.vq.concat_tokens(new)
        self.vf = self.vf[:, t:]

    @property
    def nk(self) -> int:
        return 0 if self.kq is None else self.kq.m

    @property
    def nv(self) -> int:
        return 0 if self.vq is None else self.vq.m

    # ------------------------------------------------------------ the stream protocol
    def segments(self) -> list[Segment]:
        H = self.pos.shape[0]
        if self.pos.shape[1] == 0:
            return []
        keys = concat_stores([self.kq, DenseStore(self.kf)])
        values = concat_stores([self.vq, DenseStore(self.vf)])
        return [
            Segment(
                keys,
                values,
                self.logw.copy(),
                self.logw.copy(),
                self.pos.copy(),
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

    def append(self, k, v, pos) -> list[Segment]:
        """Add decode tokens ``k (H, t, d)``, ``v (H, t, s)`` at stream positions ``pos (t,)``."""
        H, t = k.shape[0], k.shape[-2]
        self.kf = np.concatenate([self.kf, np.asarray(k, np.float64)], axis=-2)
        self.vf = np.concatenate([self.vf, np.asarray(v, np.float64)], axis=-2)
        self.pos = np.concatenate([self.pos, np.broadcast_to(np.asarray(pos, np.int64), (H, t))], axis=-1)
        self.logw = np.concatenate([self.logw, np.zeros((H, t))], axis=-1)
        R = self.R
        if self.policy == "kivi":
            while self.kf.shape[-2] >= R:
                self._quantize_keys(R)
            self._quantize_values(self.vf.shape[-2] - R)
        else:
            while self.kf.shape[-2] >= R:
                self._quantize_keys(R)
                self._quantize_values(R)
        return self.segments()


def quantize_segments_dense(K, V, positions, logw, **policy_options) -> tuple[list[Segment], QuantizedStream]:
    """Store a weighted token set ``(H, m, ·)`` with a :class:`QuantizedStream`; returns its segments and stream."""
    stream = QuantizedStream(np.asarray(to_numpy(K)), np.asarray(to_numpy(V)), positions, logw, **policy_options)
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
    """Slots ``[a, b)`` (local to the piece) as a dense ``(L, b-a, f)`` tensor or a ``Packed``."""
    from balancekv.fast.decode_attention import Packed  # noqa: PLC0415  (torch path only)

    if isinstance(piece, QuantStore):
        f = piece.f
        if role == "keys" and piece.axis == -2:
            words = piece.packed.reshape(L, f, -1)
            sc, ze = piece.scale.reshape(L, -1, f), piece.zero.reshape(L, -1, f)
            return Packed(words, sc, ze, piece.bits, piece.group, "tokens", b - a, f, offset=a)
        if role == "values" and piece.axis == -1:
            words = piece.packed.reshape(L, piece.m, -1)[:, a:b]
            sc = piece.scale.reshape(L, piece.m, -1)[:, a:b]
            ze = piece.zero.reshape(L, piece.m, -1)[:, a:b]
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
