"""The compressed cache: one weighted token set for every method (SPEC section 1).

Every method returns a :class:`CompressedKV`. For a query ``q`` with logits
``a_i = scale * <q, k_i>`` it estimates attention as::

    z(q) = sum_i exp(a_i + num_logw_i) v_i / sum_i exp(a_i + den_logw_i)

Exact tokens have log-weight 0 in both sets; single-set methods have
``num_logw == den_logw`` (ordinary attention with an additive logit bias);
two-set methods (theory BalanceKV, SubGen) put numerator and denominator
samples in separate slots, ``-inf`` in the set they do not belong to. Padding
slots, needed because heads keep different numbers of tokens, are ``-inf`` in
both.

Heads at different levels (``compress(..., eps=...)`` chooses per head) are held
*ragged* (:class:`RaggedKV`): one sub-cache per level over the heads that chose it,
so a cache holds about the sum of its heads' own slots, not heads x the widest head;
attention runs one call per group and puts the outputs back in head order. Its
``keys``/``values``/``positions`` and :meth:`CompressedKV.to_dense` are padded arrays
built on demand.

Where the data lives: a cache built from torch tensors holds torch tensors on
the caller's device (kept tokens in the caller's dtype, log-weights in the
compute dtype, positions int32), one built from NumPy holds NumPy arrays.
Dense slots sit in one buffer with spare capacity (:class:`SlotArena`), so
decode tokens are written in place and a cache of dense single-set slots is
attended by one ``scaled_dot_product_attention`` call over a view; quantized
stores stay packed and are dequantized on the fly (Triton reads the codes in
place on CUDA). Memory accounting: :mod:`balancekv.storage`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from . import _validate as V_
from ._arrays import Kind, cat, compute_dtype, held_nbytes, is_torch, isfinite, to_numpy, torch
from .storage import POSITION_NP, DenseStore, Segment, as_positions, check_stream_length, dense_segment, position_dtype

BACKENDS = ("auto", "reference", "torch", "triton")


def _zeros(kind: Kind, shape, dtype):
    if kind.is_torch:
        return torch.zeros(shape, dtype=dtype, device=kind.device)
    return np.zeros(shape, dtype=dtype)


def _same(a, b) -> bool:
    """``a`` and ``b`` are one array or equal arrays (``-inf`` padding compares equal)."""
    if a is b:
        return True
    if is_torch(a):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a.shape == b.shape and bool(np.array_equal(a, b))


class SlotArena:
    """Every dense slot of a cache in one buffer with spare capacity, in stream order of arrival.

    The segments a method built are copied in once (``prefix``) and become views of the
    buffer; decode tokens are written after them, growing the buffer by a sixteenth (at least 16
    slots) when it is full: spare capacity stays within about 6% of what is held, and an append costs
    amortised O(16) slot copies.
    """

    def __init__(self, segments: list[Segment], kind: Kind, lead: tuple, d: int, s: int):
        self.kind, self.lead = kind, tuple(lead)
        wdt = kind.compute if kind.is_torch else np.float64
        self.bounds = []  # (start, stop, label, meta) of each prefix segment
        a = 0
        for sg in segments:
            self.bounds.append((a, a + sg.m, sg.label, sg.meta))
            a += sg.m
        self.used = a
        #: one log-weight array serves both sets when every segment has equal ones (a single-set cache: an
        #: attention bias); ``den`` is then ``num`` itself and is held once
        self.shared = all(_same(sg.num_logw, sg.den_logw) for sg in segments)
        if len(segments) == 1:  # one segment: its arrays become the buffer (no copy until it grows)
            (sg,) = segments
            self.keys, self.values, self.num, self.den, self.pos = (
                sg.keys.dense(),
                sg.values.dense(),
                sg.num_logw,
                sg.den_logw,
                as_positions(sg.positions),
            )
        elif segments:
            self.keys = cat([sg.keys.dense() for sg in segments], -2)
            self.values = cat([sg.values.dense() for sg in segments], -2)
            self.num = cat([sg.num_logw for sg in segments], -1)
            self.den = None if self.shared else cat([sg.den_logw for sg in segments], -1)
            self.pos = as_positions(cat([sg.positions for sg in segments], -1))
        else:
            self.keys = _zeros(kind, self.lead + (0, d), kind.dtype)
            self.values = _zeros(kind, self.lead + (0, s), kind.value_dtype)
            self.num = _zeros(kind, self.lead + (0,), wdt)
            self.den = _zeros(kind, self.lead + (0,), wdt)
            self.pos = _zeros(kind, self.lead + (0,), position_dtype(kind))
        if self.shared:
            self.den = self.num

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[-2])

    def _grow(self, need: int) -> None:
        cap = max(need, self.capacity + max(16, self.capacity // 16))

        new = {}
        for name in ("keys", "values"):
            x = getattr(self, name)
            y = _zeros(self.kind, self.lead + (cap, x.shape[-1]), x.dtype)
            y[..., : self.used, :] = x[..., : self.used, :]
            new[name] = y
        for name in ("num", "pos") if self.shared else ("num", "den", "pos"):
            x = getattr(self, name)
            y = _zeros(self.kind, self.lead + (cap,), x.dtype)
            y[..., : self.used] = x[..., : self.used]
            new[name] = y
        for name, y in new.items():
            setattr(self, name, y)
        if self.shared:
            self.den = self.num

    def append(self, k, v, pos) -> None:
        """Exact tokens ``k (…, t, d)``, ``v (…, t, s)`` at stream positions ``pos (t,)``."""
        t = int(k.shape[-2])
        if self.used + t > self.capacity:
            self._grow(self.used + t)
        a, b = self.used, self.used + t
        self.keys[..., a:b, :] = k
        self.values[..., a:b, :] = v
        self.num[..., a:b] = 0
        if not self.shared:
            self.den[..., a:b] = 0
        self.pos[..., a:b] = pos
        self.used = b

    def view(self, a: int, b: int, label: str = "", meta: dict | None = None) -> Segment:
        seg = dense_segment(
            self.keys[..., a:b, :],
            self.values[..., a:b, :],
            self.num[..., a:b],
            self.den[..., a:b],
            self.pos[..., a:b],
            label,
        )
        return replace(seg, meta=dict(meta or {}))

    def segments(self) -> list[Segment]:
        out = [self.view(a, b, label, meta) for a, b, label, meta in self.bounds]
        end = self.bounds[-1][1] if self.bounds else 0
        if self.used > end:
            out.append(self.view(end, self.used, "appended"))
        return out

    def whole(self) -> Segment:
        return self.view(0, self.used, "all")


def _is_dense(sg: Segment) -> bool:
    return isinstance(sg.keys, DenseStore) and isinstance(sg.values, DenseStore)


class CompressedKV:
    """A compressed KV cache (keys ``(…, m, d)``, values ``(…, m, s)``, two log-weight sets).

    Attributes
    ----------
    keys, values : array in the caller's kind (NumPy or torch, same device), a concatenated copy
        (dequantized when a method stores them in low bits; for a :class:`RaggedKV`, padded to the
        widest head).
    num_logw, den_logw : ``(…, m)`` log-weights of the numerator and denominator estimates.
    positions : ``(…, m)`` int32 (the cache's kind), index in the input stream of each slot (-1 = padding).
    nbytes : bytes of every array the cache holds, each storage once (see :mod:`balancekv.storage`).
    ratio : ``nbytes`` divided by the input cache's bytes in the input's dtype.
    diagnostics : dict with the method, options, per-head level, seed, retries, and the probe error
        when it was measured (``compress(..., measure=True)``, always in ``eps`` mode).
    """

    def __init__(
        self,
        segments: list[Segment],
        *,
        lead: tuple[int, ...],
        d: int,
        s: int,
        n_seen: int,
        scale: float,
        kind: Kind,
        method: str,
        diagnostics: dict | None = None,
        stream: Any = None,
        work_kind: Kind | None = None,
    ):
        self._describe(lead, d, s, n_seen, scale, kind, method, diagnostics)
        self._stream = stream
        # the dtype streams compute in (float64 NumPy on the reference path)
        self.work_kind = work_kind or (
            Kind("torch", compute_dtype(kind.dtype), kind.device) if kind.is_torch else Kind("numpy", np.float64)
        )
        self._set_segments(segments)

    @property
    def _other(self) -> list[Segment]:
        """The segments outside the arena (a stream's, built on first use after an append)."""
        if self._other_segs is None:
            if self._copies:  # built for this read, not kept: the stream's state is what the cache holds
                return [sg.to_kind(self.kind) for sg in self._stream.segments()]
            self._other_segs = list(self._stream.segments())
        return self._other_segs

    @property
    def _copies(self) -> bool:
        return self._stream is not None and getattr(self._stream, "segments_are_copies", False)

    @_other.setter
    def _other(self, segments: list[Segment]) -> None:
        self._other_segs = segments

    def _set_segments(self, segments: list[Segment]) -> None:
        """Dense segments go into one arena (views of it stay the segments); others stay as they are.

        A cache with a decode stream keeps the stream's segments as they are (the stream owns them)."""
        segments = list(segments)  # already in the cache's kind (see compress)
        if self._stream is not None:  # the stream owns its storage: its segments are used as they are
            self._other = None if self._copies else segments
            if getattr(self, "_arena", None) is None or self._arena.used:
                self._arena = SlotArena([], self.kind, self.lead, self.d, self.s)
            return  # (an empty arena is kept from step to step)
        else:
            dense = [sg for sg in segments if _is_dense(sg)]
            self._other = [sg for sg in segments if not _is_dense(sg)]
        self._arena = SlotArena(dense, self.kind, self.lead, self.d, self.s)

    def _describe(self, lead, d, s, n_seen, scale, kind, method, diagnostics) -> None:
        """The attributes every cache has: shape, tokens seen, scale, kind, method, diagnostics."""
        self.lead, self.d, self.s = tuple(lead), int(d), int(s)
        self.n_seen = int(n_seen)
        self.scale = float(scale)
        self.kind = kind
        self.method = method
        self.diagnostics = dict(diagnostics or {})

    @property
    def _like(self):
        """An array of the cache's kind (what queries and appended tokens are checked against)."""
        return self._arena.keys

    # ------------------------------------------------------------------ contents
    @property
    def segments(self) -> list[Segment]:
        return self._other + self._arena.segments()

    def _cat(self, f, axis, segments=None):
        return cat([f(sg) for sg in (self.segments if segments is None else segments)], axis)

    @property
    def keys(self):
        return self._cat(lambda sg: sg.keys.dense(), -2)

    @property
    def values(self):
        return self._cat(lambda sg: sg.values.dense(), -2)

    @property
    def num_logw(self):
        return self._cat(lambda sg: sg.num_logw, -1)

    @property
    def den_logw(self):
        return self._cat(lambda sg: sg.den_logw, -1)

    @property
    def positions(self):
        return self._cat(lambda sg: sg.positions, -1)

    @property
    def m(self) -> int:
        """Slots in the rectangular arrays (the largest head's size, padding included)."""
        return sum(sg.m for sg in self._other) + self._arena.used

    def kept(self) -> np.ndarray:
        """Number of non-padding slots per head, shape ``lead`` (NumPy, on the host)."""
        total = 0
        for sg in self.segments:
            v = sg.valid()
            c = v.sum(-1)
            total = total + (np.asarray(c.cpu().tolist()) if is_torch(c) else c)
        return np.asarray(total).reshape(self.lead)

    @property
    def nbytes(self) -> int:
        """Bytes of every array and tensor the cache holds (slots, weights, positions, codes, scales,
        spare capacity, decode-stream state), each storage counted once. The ``diagnostics`` dict, host-side
        metadata about the build, is not billed."""
        return self.nbytes_with()

    def nbytes_with(self, *others) -> int:
        """:attr:`nbytes` together with the arrays reachable from ``others``, each storage counted once."""
        # (segments the stream builds on a read are not held; its state is, through the stream)
        return held_nbytes(self._other_segs or [], self._arena, self._stream, *others)

    @property
    def input_nbytes(self) -> int:
        """Bytes of the uncompressed cache of the same tokens in the input's dtypes:
        ``heads * n * (d * itemsize(K) + s * itemsize(V))``."""
        per = self.d * Kind.itemsize(self.kind.dtype) + self.s * Kind.itemsize(self.kind.value_dtype)
        return int(np.prod(self.lead, dtype=np.int64)) * self.n_seen * per

    @property
    def ratio(self) -> float:
        """``nbytes / input_nbytes``: about 1 for the exact cache, 0.25 for a 4x smaller one."""
        return self.nbytes / self.input_nbytes

    @property
    def single_set(self) -> bool:
        """True when one log-weight set serves numerator and denominator (an attention bias)."""
        return self._single_set(self.segments)

    @staticmethod
    def _single_set(segments) -> bool:
        for sg in segments:
            same = (
                torch.equal(sg.num_logw, sg.den_logw)
                if is_torch(sg.num_logw)
                else np.array_equal(sg.num_logw, sg.den_logw)
            )
            if not same:
                return False
        return True

    # ------------------------------------------------------------------ queries
    def parts(self):
        """The cache as parts for :func:`balancekv.fast.attend_parts` (torch caches): dense slots as
        tensor views, quantized stores as :class:`~balancekv.fast.Packed` codes (never dequantized here)."""
        from balancekv.quantized import store_parts  # noqa: PLC0415  (quantized imports this module)

        L = int(math.prod(self.lead)) if self.lead else 1
        if self._other_segs is None and not self._copies:  # an in-kind stream after an append: its own buffers
            out = self._stream.flat_parts()
        else:  # (a stream whose segments are copies builds them for this read)
            out = [p for sg in self._other for p in store_parts(sg, L)]
        if self._arena.used:
            w = self._arena.whole()
            r = lambda x: x.reshape((L,) + tuple(x.shape[len(self.lead) :]))
            out.append((r(w.keys.dense()), r(w.values.dense()), r(w.num_logw), r(w.den_logw), r(w.positions)))
        return out

    def attend(self, Q, *, positions=None, backend: str = "auto"):
        """Estimated attention ``z(q)`` for queries ``Q (…, mq, d)`` (same leading dims as the cache).

        ``positions`` (optional, ints of shape ``(mq,)`` or ``(…, mq)``): the stream index of
        each query; slots holding later tokens are masked out (causal attention).
        Returns ``(…, mq, s)`` in ``Q``'s kind and device. Torch: ``Q``'s dtype promoted with the values' (fp16
        queries over fp32 values give fp32, so large values do not overflow; bf16 over bf16 gives bf16). NumPy: at
        least float32 (the reference computes in float64; float16 in and out would overflow at moderate norms).
        Torch caches run the torch estimator (SDPA for one dense single-set buffer, split partial sums otherwise;
        the Triton split-K kernel on CUDA); NumPy caches the NumPy reference.
        """
        V_.check_queries("Q", Q, self.lead, self.d, like=self._like)
        V_.check_choice("backend", backend, BACKENDS)
        qpos = None
        if positions is not None:
            qpos = positions if is_torch(positions) else np.asarray(positions)
            dt_ok = (
                (not qpos.is_floating_point() and qpos.dtype != torch.bool)
                if is_torch(qpos)
                else (np.issubdtype(qpos.dtype, np.integer))
            )
            if qpos.ndim == 0 or qpos.shape[-1] != Q.shape[-2] or not dt_ok:
                raise ValueError(
                    f"positions must be integers with last dim {Q.shape[-2]} (one per query), "
                    f"got shape {tuple(qpos.shape)} dtype {qpos.dtype}"
                )
            if qpos.ndim > 1 and tuple(qpos.shape[:-1]) != self.lead:
                raise ValueError(
                    f"positions must have shape ({Q.shape[-2]},) or {self.lead + (Q.shape[-2],)}, "
                    f"got {tuple(qpos.shape)}"
                )
        if qpos is not None:
            first = self._first_position()
            if int(qpos.min()) < first:
                raise ValueError(
                    f"positions: a query at position {int(qpos.min())} precedes every slot of some head (the "
                    f"earliest held token of every head is at {first} or later), so it attends to nothing"
                )
        return self._attend(Q, qpos, backend)

    def attend_rows(
        self, Qr, scale: float | None = None, *, query_positions=None, dtype=None, backend: str = "auto", extra=()
    ):
        """:func:`balancekv.fast.attend_parts` over this (torch) cache for queries ``Qr (L, R, d)``, row block
        ``l`` read by flattened head ``l`` (``L = prod(lead)``; GQA callers put a KV head's query heads in its
        rows); ``query_positions`` ``(R,)`` or ``(L, R)``. What :mod:`balancekv.hf` calls each decode step:
        no validation, no copy of the cache. ``extra``: more parts ``(K, V, num_logw, den_logw, positions)``
        with ``(L, …)`` leading dims, attended beside the cache's (tokens not appended yet). Returns ``(L, R, s)``."""
        from balancekv.fast.decode_attention import attend_parts  # noqa: PLC0415  (torch path only)

        return attend_parts(
            Qr,
            self.parts() + list(extra),
            self.scale if scale is None else scale,
            query_positions=query_positions,
            dtype=dtype,
            backend=backend,
        )

    def _attend(self, Q, qpos, backend: str):
        """:meth:`attend` after validation (``qpos``: None, or ints ``(mq,)`` / ``lead + (mq,)``)."""
        if self.kind.is_torch:
            from balancekv.fast.decode_attention import attend_parts  # noqa: PLC0415  (torch path only)

            L = int(math.prod(self.lead)) if self.lead else 1
            mq = Q.shape[-2]
            qp = None
            if qpos is not None:
                qp = torch.as_tensor(qpos, device=Q.device).to(torch.int64)
                qp = torch.broadcast_to(qp, tuple(Q.shape[:-1])).reshape(L, mq)
            out = attend_parts(
                Q.reshape(L, mq, self.d),
                self.parts(),
                self.scale,
                query_positions=qp,
                backend="torch" if backend == "reference" else backend,
            )
            return out.reshape(tuple(Q.shape[:-1]) + (self.s,)).to(torch.promote_types(Q.dtype, self.kind.value_dtype))
        from balancekv.reference import softmax_attention as ra  # noqa: PLC0415  (reference path only)

        segs = self.segments  # once (a stream whose segments are copies builds them per read)
        f = lambda get, axis: self._cat(get, axis, segs)
        K, Vv = f(lambda sg: sg.keys.dense(), -2), f(lambda sg: sg.values.dense(), -2)
        nl, dl = f(lambda sg: sg.num_logw, -1), f(lambda sg: sg.den_logw, -1)
        mask = None
        if qpos is not None:
            mask = f(lambda sg: sg.positions, -1)[..., None, :] <= np.asarray(qpos)[..., :, None]
        out = ra.weighted_attention(to_numpy(Q), to_numpy(K), to_numpy(Vv), nl, dl, self.scale, mask=mask)
        return out.astype(np.result_type(Q.dtype, np.float32))

    def _first_position(self) -> int:
        """The largest, over heads, of each head's earliest held position (a query before it sees nothing)."""
        segs = self.segments
        pos, valid = self._cat(lambda sg: sg.positions, -1, segs), cat([sg.valid() for sg in segs], -1)
        if is_torch(pos):
            big = torch.iinfo(pos.dtype).max
            return int(torch.where(valid, pos, torch.full_like(pos, big)).amin(-1).max())
        return int(np.where(valid, pos, np.iinfo(pos.dtype).max).min(-1).max())

    # ------------------------------------------------------------------ decoding
    def _working(self, x, name: str):
        """An appended array in the cache's storage dtype; ``ValueError`` naming it if that overflows."""
        dt = self.kind.dtype if name == "k" else self.kind.value_dtype
        if is_torch(x):
            y = x.detach().to(device=self.kind.device, dtype=dt)
        else:
            y = np.asarray(x, dtype=dt)
        if y.dtype != x.dtype and not bool(isfinite(y).all()):  # (x itself is checked by append)
            raise ValueError(f"{name} does not fit the cache's dtype {self.kind.dtype} (it would overflow to inf)")
        return y

    def append(self, k, v) -> CompressedKV:
        """Add decode-time tokens ``k (…, t, d)``, ``v (…, t, s)``; returns ``self``.

        Streaming methods (``balance-stream``, ``subgen``, the quantization decode
        policies, ``streaming``) keep compressing; every other method stores the new
        tokens exactly, written in place into the cache's slot buffer. Tokens are stored in
        the cache's dtype (a ``ValueError`` names ``k`` or ``v`` if they do not fit it). The
        caller's arrays are copied, never kept or modified.
        """
        V_.check_kv(k, v, "k", "v", allow_empty=True)
        if k.shape[-2] == 0:
            return self  # nothing to add
        V_.check_same_kind(("k", "the cache"), (k, self._like))
        if tuple(k.shape[:-2]) != self.lead:
            raise ValueError(f"k must have the cache's leading dims {self.lead}, got {tuple(k.shape[:-2])}")
        if k.shape[-1] != self.d or v.shape[-1] != self.s:
            raise ValueError(
                f"k and v must have feature dims d={self.d}, s={self.s}, got {k.shape[-1]} and {v.shape[-1]}"
            )
        self.append_rows(self._working(k, "k"), self._working(v, "v"))
        return self

    @property
    def has_stream(self) -> bool:
        """True when appended tokens go through a decode policy (a window that slides, a sketch, sets that merge,
        a quantized residual) rather than straight into exact slots: an append can then move or drop older tokens."""
        return self._stream is not None

    def append_rows(self, k, v) -> None:
        """:meth:`append` without its validation (what :mod:`balancekv.hf`'s decode steps call: the model's tensors
        have the cache's leading dims and feature sizes by construction; like transformers' own caches, their values
        are the model's): converted to the storage dtypes, the stream length checked."""
        t = int(k.shape[-2])
        check_stream_length(self.n_seen + t, "the cache's stream")
        kd, vd = self.kind.dtype, self.kind.value_dtype
        self._append_stored(k if k.dtype == kd else k.to(kd), v if v.dtype == vd else v.to(vd), t)
        self.n_seen += t

    def _append_stored(self, ks, vs, t: int) -> None:
        """:meth:`append` after validation: ``ks``, ``vs`` in the cache's storage dtypes (``n_seen`` not updated)."""
        if self.kind.is_torch:
            pos = torch.arange(self.n_seen, self.n_seen + t, device=self.kind.device, dtype=torch.int32)
        else:
            pos = np.arange(self.n_seen, self.n_seen + t, dtype=POSITION_NP)
        if self._stream is not None:
            wk = self.work_kind
            if wk.is_torch:
                as_t = lambda x: (x if is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))).to(
                    device=wk.device, dtype=wk.dtype
                )
                kw, vw = as_t(ks), as_t(vs)
                pw = as_positions(pos, like=kw)  # ints, never through the float working dtype
            else:
                kw, vw, pw = to_numpy(ks), to_numpy(vs), to_numpy(pos, POSITION_NP)
            if (getattr(self._stream, "in_kind", False) or self._copies) and hasattr(self._stream, "push"):
                # a stream holding its state in the cache's kind: its segments are built when asked for (a decode
                # step's attention reads the stream's flat parts, :meth:`parts`), not reshaped every step
                self._stream.push(kw, vw, pw)
                self._other_segs = None
                return
            segs = self._stream.append(kw, vw, pw)
            if not getattr(self._stream, "in_kind", False):  # a stream holding its state in the cache's kind
                segs = [sg.to_kind(self.kind) for sg in segs]  # returns its segments in it already
            self._set_segments(segs)
        else:
            self._arena.append(ks, vs, pos)

    def observe(self, Q) -> CompressedKV:
        """Tell the cache's decode policy which queries ``Q (…, mq, d)`` attended to it (returns ``self``).

        Only a policy that evicts by accumulated attention (``compress(..., method="h2o", cap=C)``, online
        H2O) uses them: each query's attention probabilities over the held slots are added to the slots'
        scores. For every other cache this does nothing. :mod:`balancekv.hf` calls it after each
        decode step's attention.
        """
        if self._stream is None or not getattr(self._stream, "observes", False):
            return self
        V_.check_queries("Q", Q, self.lead, self.d, like=self._like)
        wk = self.work_kind
        if wk.is_torch:
            q = (Q if is_torch(Q) else torch.from_numpy(np.ascontiguousarray(Q))).detach().to(wk.device, wk.dtype)
        else:
            q = to_numpy(Q, np.float64)
        self._stream.observe(q)
        return self

    # ------------------------------------------------------------------ export
    def to_dense(self, augmented: bool = False):
        """Keys, values and an additive logit bias for any attention kernel with a bias input.

        For a single-set cache returns ``(keys, values, bias)`` with ``bias = num_logw``;
        ``softmax(scale * q K^T + bias) @ values`` is then exactly :meth:`attend`.
        A two-set cache has no such form; with ``augmented=True`` it returns
        ``(keys, values_aug, bias)`` where numerator slots carry ``(v, 0)`` and
        denominator slots ``(0, 1)``: with ``o = softmax(scale * q K^T + bias) @ values_aug``
        the estimate is ``o[..., :-1] / o[..., -1:]`` (works for single-set caches too).
        """
        segs = self.segments
        f = lambda get, axis: self._cat(get, axis, segs)
        K, Vv = f(lambda sg: sg.keys.dense(), -2), f(lambda sg: sg.values.dense(), -2)
        nl, dl = f(lambda sg: sg.num_logw, -1), f(lambda sg: sg.den_logw, -1)
        if not augmented:
            if not self._single_set(segs):
                raise ValueError(
                    "this cache has separate numerator and denominator weights (a two-set "
                    "method); use to_dense(augmented=True)"
                )
            return K, Vv, nl
        if is_torch(K):
            zeros_v = torch.zeros_like(Vv[..., :1])
            num_part = torch.cat([Vv, zeros_v], dim=-1)
            den_part = torch.cat([torch.zeros_like(Vv), torch.ones_like(zeros_v)], dim=-1)
            return torch.cat([K, K], dim=-2), torch.cat([num_part, den_part], dim=-2), torch.cat([nl, dl], dim=-1)
        zeros_v = np.zeros(Vv.shape[:-1] + (1,), Vv.dtype)
        num_part = np.concatenate([Vv, zeros_v], axis=-1)
        den_part = np.concatenate([np.zeros_like(Vv), np.ones_like(zeros_v)], axis=-1)
        return (
            np.concatenate([K, K], axis=-2),
            np.concatenate([num_part, den_part], axis=-2),
            np.concatenate([nl, dl], axis=-1),
        )

    def __repr__(self) -> str:
        kept = self.kept()
        return (
            f"CompressedKV(method={self.method!r}, lead={self.lead}, n={self.n_seen}, "
            f"kept={int(kept.min())}..{int(kept.max())} per head, nbytes={self.nbytes}, "
            f"ratio={self.ratio:.4f}, single_set={self.single_set})"
        )


class RaggedKV(CompressedKV):
    """A cache whose heads chose different levels: one sub-cache per level, over the heads that chose it.

    Padding every head to the widest one (the layout before) made every head pay for the widest: on SmolLM2
    one exact head made a layer cost 1.09x the fp16 cache. Here each group of heads (the heads that chose
    one level, in head order) is a :class:`CompressedKV` of its own over leading dims ``(heads in the group,)``
    — its own slot arena, its own quantized codes and decode stream — so the cache holds about the sum of
    its heads' own slots (``nbytes`` walks every group; each group's spare capacity is its own).

    Queries: one attention call per group over that group's storage (views, never a padded copy; one SDPA
    call for a dense single-set group), the outputs put back in head order (:meth:`attend`,
    :meth:`attend_rows`). Appends write each group's buffer (or feed its stream) with its heads' tokens.

    What is built on demand (a copy, not held): ``segments`` is one dense segment padded to the widest
    head (padding slots: ``-inf`` in both weight sets, position -1; quantized groups dequantized), and so
    ``keys``, ``values``, ``num_logw``, ``den_logw``, ``positions``, :meth:`to_dense` and :meth:`parts` are
    padded arrays of ``m`` slots per head, each head's slots in its group's order.
    """

    def __init__(
        self,
        groups: list[tuple[np.ndarray, CompressedKV]],
        *,
        lead: tuple[int, ...],
        d: int,
        s: int,
        n_seen: int,
        scale: float,
        kind: Kind,
        method: str,
        diagnostics: dict | None = None,
        work_kind: Kind | None = None,
    ):
        self._describe(lead, d, s, n_seen, scale, kind, method, diagnostics)
        self._stream = None
        self.work_kind = work_kind or groups[0][1].work_kind
        L = int(math.prod(self.lead)) if self.lead else 1
        heads = np.concatenate([np.asarray(h, np.int64) for h, _ in groups])
        if sorted(heads.tolist()) != list(range(L)):
            raise ValueError(f"the groups' heads must cover each of the {L} heads once, got {heads.tolist()}")
        self._groups = [(np.asarray(h, np.int64), c) for h, c in groups]
        inv = np.argsort(heads, kind="stable")  # output row of head l in the groups' concatenation
        self._index, self._inv = None, inv
        if kind.is_torch:  # the groups' head indices on the cache's device (a few bytes, held)
            dev = kind.device
            self._index = ([torch.as_tensor(h, device=dev) for h, _ in self._groups], torch.as_tensor(inv, device=dev))

    @property
    def groups(self) -> list[tuple[np.ndarray, CompressedKV]]:
        """``[(heads, cache)]``: the flattened head indices of each group and its sub-cache (lead ``(len(heads),)``)."""
        return list(self._groups)

    @property
    def _like(self):
        return self._groups[0][1]._like

    def _rows(self, x, j: int):
        """Rows of group ``j``'s heads of ``x (L, …)`` (x's kind)."""
        if is_torch(x):
            return x.index_select(0, self._index[0][j].to(x.device))
        return np.asarray(x)[self._groups[j][0]]

    def _stitch(self, outs):
        """The groups' outputs ``(L_j, …)`` back in head order ``(L, …)``."""
        if is_torch(outs[0]):
            return torch.cat(outs, 0).index_select(0, self._index[1].to(outs[0].device))
        return np.concatenate(outs, 0)[self._inv]

    # ------------------------------------------------------------------ contents
    def _padded(self) -> Segment:
        """Every head's slots in one dense segment as wide as the widest head (a copy, built on demand)."""
        L = int(math.prod(self.lead)) if self.lead else 1
        M = max(c.m for _, c in self._groups)
        wdt = self.kind.compute if self.kind.is_torch else np.float64
        pdt = position_dtype(self.kind)
        vk = self.kind.for_values()
        K = _zeros(self.kind, (L, M, self.d), self.kind.dtype)
        Vv = _zeros(vk, (L, M, self.s), vk.dtype)
        nl = _zeros(self.kind, (L, M), wdt)
        nl[...] = -np.inf
        dl = _zeros(self.kind, (L, M), wdt)
        dl[...] = -np.inf
        pos = _zeros(self.kind, (L, M), pdt)
        pos[...] = -1
        for j, (h, c) in enumerate(self._groups):
            m = c.m
            if not m:
                continue
            idx = self._index[0][j] if self._index is not None else h
            K[idx, :m] = c.keys.to(K.dtype) if is_torch(K) else c.keys.astype(K.dtype)
            Vv[idx, :m] = c.values.to(Vv.dtype) if is_torch(Vv) else c.values.astype(Vv.dtype)
            nl[idx, :m] = c.num_logw
            dl[idx, :m] = c.den_logw
            pos[idx, :m] = c.positions
        lead = self.lead
        r = lambda x, tail: x.reshape(lead + tail)
        return dense_segment(
            r(K, (M, self.d)), r(Vv, (M, self.s)), r(nl, (M,)), r(dl, (M,)), r(pos, (M,)), "ragged (padded copy)"
        )

    @property
    def segments(self) -> list[Segment]:
        """One dense segment padded to the widest head: a copy built on each call (see the class docstring)."""
        return [self._padded()]

    @property
    def m(self) -> int:
        """Slots of the widest head (the width of the padded arrays)."""
        return max(c.m for _, c in self._groups)

    def kept(self) -> np.ndarray:
        L = int(math.prod(self.lead)) if self.lead else 1
        out = np.zeros(L, dtype=np.int64)
        for h, c in self._groups:
            out[h] = c.kept().reshape(-1)
        return out.reshape(self.lead)

    @property
    def nbytes(self) -> int:
        """Bytes of every array each group holds (and the groups' head indices), each storage once."""
        return self.nbytes_with()

    def nbytes_with(self, *others) -> int:
        groups = [(h, (c._other_segs or [], c._arena, c._stream)) for h, c in self._groups]
        return held_nbytes(groups, self._index, self._inv, *others)

    @property
    def single_set(self) -> bool:
        return all(c.single_set for _, c in self._groups)

    def _first_position(self) -> int:
        return max(c._first_position() for _, c in self._groups)

    # ------------------------------------------------------------------ queries
    def parts(self):
        """The padded layout as one dense part (a copy; decode calls :meth:`attend_rows`, which copies nothing)."""
        L = int(math.prod(self.lead)) if self.lead else 1
        w = self._padded()
        r = lambda x: x.reshape((L,) + tuple(x.shape[len(self.lead) :]))
        return [(r(w.keys.dense()), r(w.values.dense()), r(w.num_logw), r(w.den_logw), r(w.positions))]

    def attend_rows(
        self, Qr, scale: float | None = None, *, query_positions=None, dtype=None, backend: str = "auto", extra=()
    ):
        """One :func:`~balancekv.fast.attend_parts` call per group over its rows of ``Qr (L, R, d)`` (and of each
        ``extra`` part's tensors); outputs in head order."""
        qp = None
        if query_positions is not None:
            qp = torch.as_tensor(query_positions, device=Qr.device)
            if qp.ndim > 1:
                qp = torch.broadcast_to(qp, (Qr.shape[0], qp.shape[-1]))
        outs = []
        for j, (_, c) in enumerate(self._groups):
            qj = qp if qp is None or qp.ndim == 1 else self._rows(qp, j)
            ex = [tuple(None if x is None else self._rows(x, j) for x in part) for part in extra]
            outs.append(
                c.attend_rows(self._rows(Qr, j), scale, query_positions=qj, dtype=dtype, backend=backend, extra=ex)
            )
        return self._stitch(outs)

    def _attend(self, Q, qpos, backend: str):
        L = int(math.prod(self.lead)) if self.lead else 1
        mq = int(Q.shape[-2])
        Qf = Q.reshape(L, mq, self.d)
        pf = None
        if qpos is not None:
            if is_torch(Q):
                pf = torch.broadcast_to(torch.as_tensor(qpos, device=Q.device).to(torch.int64), tuple(Q.shape[:-1]))
            else:
                pf = np.broadcast_to(np.asarray(qpos), tuple(Q.shape[:-1]))
            pf = pf.reshape(L, mq)
        outs = [
            c._attend(self._rows(Qf, j), None if pf is None else self._rows(pf, j), backend)
            for j, (_, c) in enumerate(self._groups)
        ]
        return self._stitch(outs).reshape(tuple(Q.shape[:-1]) + (self.s,))

    # ------------------------------------------------------------------ decoding
    @property
    def has_stream(self) -> bool:
        return any(c.has_stream for _, c in self._groups)

    def _append_stored(self, ks, vs, t: int) -> None:
        L = int(math.prod(self.lead)) if self.lead else 1
        kf, vf = ks.reshape(L, t, self.d), vs.reshape(L, t, self.s)
        for j, (_, c) in enumerate(self._groups):
            c._append_stored(self._rows(kf, j), self._rows(vf, j), t)
            c.n_seen += t

    def observe(self, Q) -> CompressedKV:
        if not any(c._stream is not None and getattr(c._stream, "observes", False) for _, c in self._groups):
            return self
        V_.check_queries("Q", Q, self.lead, self.d, like=self._like)
        L = int(math.prod(self.lead)) if self.lead else 1
        Qf = Q.reshape(L, *Q.shape[-2:])
        for j, (_, c) in enumerate(self._groups):
            c.observe(self._rows(Qf, j))
        return self
