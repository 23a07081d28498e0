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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate as V_
from ._arrays import Kind, is_torch, to_numpy, torch
from .storage import Segment, exact_segment, xp_cat

BACKENDS = ("auto", "reference", "torch", "triton")


class CompressedKV:
    """A compressed KV cache (keys ``(…, m, d)``, values ``(…, m, s)``, two log-weight sets).

    Attributes
    ----------
    keys, values : array in the caller's kind (NumPy or torch, same device)
        Dequantized on read when a method stores them in low bits.
    num_logw, den_logw : ``(…, m)`` log-weights of the numerator and denominator estimates.
    positions : ``(…, m)`` int64 NumPy array, index in the input stream of each slot (-1 = padding).
    nbytes : bytes of the compressed cache as deployed (see :mod:`balancekv.storage`).
    ratio : ``nbytes`` divided by the input cache's bytes in fp16 (``n * (d + s) * 2`` per head).
    diagnostics : dict with the method, options, per-head level and error on the probes, seed, retries.
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
    ):
        self._segments = list(segments)  # already in the cache's kind (see compress)
        self.lead, self.d, self.s = tuple(lead), int(d), int(s)
        self.n_seen = int(n_seen)
        self.scale = float(scale)
        self.kind = kind
        self.method = method
        self.diagnostics = dict(diagnostics or {})
        self._stream = stream

    # ------------------------------------------------------------------ contents
    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    @property
    def keys(self):
        return xp_cat([s.keys.dense() for s in self._segments], axis=-2)

    @property
    def values(self):
        return xp_cat([s.values.dense() for s in self._segments], axis=-2)

    @property
    def num_logw(self):
        return xp_cat([s.num_logw for s in self._segments], axis=-1)

    @property
    def den_logw(self):
        return xp_cat([s.den_logw for s in self._segments], axis=-1)

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate([s.positions for s in self._segments], axis=-1)

    @property
    def m(self) -> int:
        """Slots in the rectangular arrays (the largest head's size, padding included)."""
        return sum(s.m for s in self._segments)

    def kept(self) -> np.ndarray:
        """Number of non-padding slots per head, shape ``lead``."""
        return sum(np.count_nonzero(s.valid(), axis=-1) for s in self._segments)

    @property
    def nbytes(self) -> int:
        return int(sum(s.nbytes() for s in self._segments))

    @property
    def input_nbytes(self) -> int:
        """Bytes of the uncompressed input cache in fp16: ``heads * n * (d + s) * 2``."""
        return int(np.prod(self.lead, dtype=np.int64)) * self.n_seen * (self.d + self.s) * 2

    @property
    def ratio(self) -> float:
        """``nbytes / input_nbytes``: 1.0 for an exact fp16 cache, 0.25 for a 4x smaller one."""
        return self.nbytes / self.input_nbytes

    @property
    def single_set(self) -> bool:
        """True when one log-weight set serves numerator and denominator (an attention bias)."""
        nl, dl = to_numpy(self.num_logw), to_numpy(self.den_logw)
        return bool(np.array_equal(nl, dl))

    # ------------------------------------------------------------------ queries
    def attend(self, Q, *, positions=None, backend: str = "auto"):
        """Estimated attention ``z(q)`` for queries ``Q (…, mq, d)`` (same leading dims as the cache).

        ``positions`` (optional, ints of shape ``(mq,)`` or ``(…, mq)``): the stream index of
        each query; slots holding later tokens are masked out (causal attention).
        Returns ``(…, mq, s)`` in ``Q``'s kind, device and dtype.
        """
        V_.check_queries("Q", Q, self.lead, self.d, like=self.keys)
        V_.check_choice("backend", backend, BACKENDS)
        mask = None
        if positions is not None:
            qpos = np.asarray(to_numpy(positions, np.int64) if is_torch(positions) else positions)
            if qpos.shape[-1] != Q.shape[-2] or not np.issubdtype(qpos.dtype, np.integer):
                raise ValueError(
                    f"positions must be integers with last dim {Q.shape[-2]} (one per query), "
                    f"got shape {qpos.shape} dtype {qpos.dtype}"
                )
            mask = self.positions[..., None, :] <= qpos[..., :, None]
        use_torch = backend in ("torch", "triton") or (backend == "auto" and self.kind.is_torch)
        if backend in ("triton", "auto") and is_torch(Q):
            # Triton split-K decode kernel (packed stores read in place): CUDA tensors, or
            # backend="triton" under TRITON_INTERPRET=1; otherwise the torch estimator below.
            from balancekv.fast import _triton as ft  # noqa: PLC0415

            if ft.can_run(Q) if backend == "triton" else ft.use_triton("auto", Q):
                from balancekv.fast.decode_attention import attend_compressed  # noqa: PLC0415

                out = attend_compressed(self, Q, query_positions=None if positions is None else qpos, backend="triton")
                return out.to(Q.dtype)
        if use_torch:
            from balancekv.fast import softmax_attention as fa  # noqa: PLC0415

            Kt, Vt, nl, dl = (
                x if is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))
                for x in (self.keys, self.values, self.num_logw, self.den_logw)
            )
            Qt = Q if is_torch(Q) else torch.from_numpy(np.ascontiguousarray(Q))
            mt = None if mask is None else torch.from_numpy(mask).to(Qt.device)
            out = fa.weighted_attention(
                Qt, Kt.to(Qt.device), Vt.to(Qt.device), nl.to(Qt.device), dl.to(Qt.device), self.scale, mask=mt
            )
            if is_torch(Q):
                return out.to(Q.dtype)
            return out.numpy().astype(np.result_type(Q.dtype, np.float32))
        from balancekv.reference import softmax_attention as ra  # noqa: PLC0415

        out = ra.weighted_attention(
            to_numpy(Q),
            to_numpy(self.keys),
            to_numpy(self.values),
            to_numpy(self.num_logw),
            to_numpy(self.den_logw),
            self.scale,
            mask=mask,
        )
        if is_torch(Q):
            return torch.from_numpy(out).to(device=Q.device, dtype=Q.dtype)
        return out.astype(np.result_type(Q.dtype, np.float32))

    # ------------------------------------------------------------------ decoding
    def append(self, k, v) -> "CompressedKV":
        """Add decode-time tokens ``k (…, t, d)``, ``v (…, t, s)``; returns ``self``.

        Streaming methods (``balance-stream``, ``subgen``, the quantization decode
        policies, ``streaming``) keep compressing; every other method stores the new
        tokens exactly. The caller's arrays are copied, never kept or modified.
        """
        V_.check_kv(k, v, "k", "v")
        V_.check_same_kind(("k", "the cache"), (k, self.keys))
        if tuple(k.shape[:-2]) != self.lead:
            raise ValueError(f"k must have the cache's leading dims {self.lead}, got {tuple(k.shape[:-2])}")
        if k.shape[-1] != self.d or v.shape[-1] != self.s:
            raise ValueError(
                f"k and v must have feature dims d={self.d}, s={self.s}, got {k.shape[-1]} and {v.shape[-1]}"
            )
        t = k.shape[-2]
        pos = np.arange(self.n_seen, self.n_seen + t)
        if self._stream is not None:
            segs = self._stream.append(to_numpy(k), to_numpy(v), pos)
            self._segments = [s.to_kind(self.kind) for s in segs] if self.kind.is_torch else segs
        else:
            kk = k.detach().clone() if is_torch(k) else np.array(k, copy=True)
            vv = v.detach().clone() if is_torch(v) else np.array(v, copy=True)
            self._segments.append(exact_segment(kk, vv, pos, label="appended"))
        self.n_seen += t
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
        K, Vv, nl, dl = self.keys, self.values, self.num_logw, self.den_logw
        if not augmented:
            if not self.single_set:
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
