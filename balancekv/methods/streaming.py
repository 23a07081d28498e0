"""``streaming``: StreamingLLM eviction [SLLM] — the first ``sink`` tokens and a recent window.

Kept tokens have log-weight 0 and evicted ones are simply gone, so the
estimate is biased towards the sink and the window; it is the weakest
baseline of [BKV]'s tables (needle retrieval 0.31 against BalanceKV's 0.99).
During decoding the budget stays fixed: each new token enters the window and
the oldest window token leaves.
"""

from __future__ import annotations

import numpy as np

from ..storage import exact_segment
from .base import Built, Method, check_int_option, kept_count


class SinkWindowStream:
    """Decode-time state: sink tokens plus a rolling window of fixed size."""

    def __init__(self, K, V, sink: int, window: int):
        n = K.shape[-2]
        self.sink_k, self.sink_v = K[:, :sink].copy(), V[:, :sink].copy()
        self.sink_pos = np.arange(sink)
        start = max(sink, n - window)
        self.win_k, self.win_v = K[:, start:].copy(), V[:, start:].copy()
        self.win_pos = np.arange(start, n)
        self.window = window

    def segments(self):
        segs = [exact_segment(self.sink_k, self.sink_v, self.sink_pos, "sink")] if self.sink_pos.size else []
        if self.win_pos.size:
            segs.append(exact_segment(self.win_k, self.win_v, self.win_pos, "window"))
        return segs

    def append(self, k, v, pos):
        w = self.window
        self.win_k = np.concatenate([self.win_k, k], axis=-2)[:, -w:] if w else self.win_k
        self.win_v = np.concatenate([self.win_v, v], axis=-2)[:, -w:] if w else self.win_v
        self.win_pos = np.concatenate([self.win_pos, pos])[-w:] if w else self.win_pos
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
