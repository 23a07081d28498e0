"""``exact``: the uncompressed cache (every token, log-weight 0)."""

from __future__ import annotations

import numpy as np

from ..storage import exact_segment
from .base import Built, Method


class Exact(Method):
    name = "exact"
    defaults: dict = {}
    has_theorem = True
    selects_tokens = False  # every token, always: keep < 1 is refused

    def levels(self, n, opts):
        return []  # the exact cache is the implicit fallback level of every method

    def level_for_keep(self, keep, n, opts):
        if keep != 1:
            raise ValueError(f"method 'exact' keeps every token; keep must be 1, got {keep}")
        return {"keep": 1.0}

    def build_reference(self, K, V, level, ctx):
        return Built([exact_segment(K.copy(), V.copy(), np.arange(K.shape[-2]))])

    def build_torch(self, K, V, level, ctx):
        return Built([exact_segment(K.clone(), V.clone(), np.arange(K.shape[-2]))])

    def theorem_level(self, K, V, eps, ctx):
        return None
