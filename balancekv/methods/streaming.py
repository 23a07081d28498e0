"""``streaming``: StreamingLLM eviction [SLLM] — the first ``sink`` tokens and a recent window.

Kept tokens have log-weight 0 and evicted ones are simply gone, so the
estimate is biased towards the sink and the window; it is the weakest
baseline of [BKV]'s tables (needle retrieval 0.31 against BalanceKV's 0.99).
During decoding the budget stays fixed: each new token enters the window and
the oldest window token leaves.
"""

from __future__ import annotations

import numpy as np

from .._arrays import is_torch, torch
from ..storage import DenseStore, Segment, exact_segment
from .base import Built, Method, check_int_option, kept_count


def _like_full(x, shape, value, dtype=None):
    if is_torch(x):
        return torch.full(shape, value, dtype=dtype or x.dtype, device=x.device)
    return np.full(shape, value, dtype=dtype or x.dtype)


class SinkWindowStream:
    """Decode-time state: the first ``sink`` tokens plus a ring buffer of the last ``window`` tokens.

    Each appended token overwrites the oldest window slot in place (positions say which token a
    slot holds; attention does not depend on slot order), so an append costs O(tokens appended)
    and the memory is fixed. Works on NumPy arrays and torch tensors alike.
    """

    def __init__(self, K, V, sink: int, window: int):
        H, n, d = K.shape
        copy = (lambda x: x.clone()) if is_torch(K) else (lambda x: x.copy())
        pos_of = (lambda a: torch.as_tensor(a, device=K.device)) if is_torch(K) else np.asarray
        self.sink_seg = exact_segment(copy(K[:, :sink]), copy(V[:, :sink]), np.arange(sink), "sink") if sink else None
        start = max(sink, n - window)
        L = n - start
        self.window, self.count = int(window), L
        self.wk = _like_full(K, (H, window, d), 0)
        self.wv = _like_full(V, (H, window, V.shape[-1]), 0)
        self.wlogw = _like_full(K, (H, window), -np.inf)
        self.wpos = _like_full(K, (H, window), -1, dtype=torch.int64 if is_torch(K) else np.int64)
        self.wk[:, :L], self.wv[:, :L], self.wlogw[:, :L] = K[:, start:], V[:, start:], 0
        self.wpos[:, :L] = pos_of(np.arange(start, n))

    def to_kind(self, kind) -> None:
        """Hold the state in the cache's kind (tokens in its storage dtype), once, after the build."""
        if self.sink_seg is not None:
            self.sink_seg = self.sink_seg.to_kind(kind)
        w = Segment(DenseStore(self.wk), DenseStore(self.wv), self.wlogw, self.wlogw, self.wpos).to_kind(kind)
        self.wk, self.wv, self.wlogw, self.wpos = w.keys.x, w.values.x, w.num_logw, w.positions

    def segments(self):
        segs = [self.sink_seg] if self.sink_seg is not None else []
        if self.window:
            segs.append(Segment(DenseStore(self.wk), DenseStore(self.wv), self.wlogw, self.wlogw, self.wpos, "window"))
        return segs

    def append(self, k, v, pos):
        w, t = self.window, k.shape[-2]
        if w == 0:
            return self.segments()  # no window: decode tokens are evicted at once (the stated policy)
        if t > w:  # only the last w of them stay
            k, v, pos = k[:, -w:], v[:, -w:], pos[-w:]
            self.count += t - w
            t = w
        slots = (self.count + np.arange(t)) % w
        if is_torch(self.wk):
            slots = torch.as_tensor(slots, device=self.wk.device)
        self.wk[:, slots], self.wv[:, slots] = (
            k.to(self.wk.dtype) if is_torch(k) else k,
            (v.to(self.wv.dtype) if is_torch(v) else v),
        )
        self.wlogw[:, slots] = 0
        self.wpos[:, slots] = pos
        self.count += t
        return self.segments()


class Streaming(Method):
    name = "streaming"
    defaults = {"sink": 4}

    def check_options(self, opts):
        check_int_option(opts, "sink", 0)

    def build_reference(self, K, V, level, ctx):
        n = K.shape[-2]
        m = kept_count(level["keep"], n)
        sink = min(ctx.opts["sink"], m)
        stream = SinkWindowStream(K, V, sink, m - sink)
        return Built(stream.segments(), stream=stream, info={"kept": m})

    build_torch = build_reference  # the stream is written for NumPy arrays and torch tensors alike

    supports_cap = True

    def build_capped(self, K, V, cap, ctx):
        """StreamingLLM under a cap: the first ``sink`` tokens and a ring of the last ``cap - sink`` (the
        ring starts with the prompt's last tokens and fills up before it overwrites)."""
        sink = min(ctx.opts["sink"], K.shape[-2], cap - 1)
        stream = SinkWindowStream(K, V, sink, cap - sink)
        return Built(stream.segments(), stream=stream, info={"cap": int(cap), "sink": sink, "window": cap - sink})
