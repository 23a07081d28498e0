"""``uniform``: keep ``m`` tokens uniformly without replacement, each with weight ``n/m`` (SPEC 4c)."""

from __future__ import annotations

import numpy as np

from balancekv.reference.sampling import uniform_sample_indices

from .._arrays import host_uniforms
from ..storage import input_rows_segment
from .base import Built, Method, kept_count


class Uniform(Method):
    name = "uniform"
    defaults: dict = {}

    def build_reference(self, K, V, level, ctx):
        H, n, _ = K.shape
        m = kept_count(level["keep"], n)
        idx = uniform_sample_indices(n, m, H, ctx.rng)
        logw = np.full((H, m), np.log(n / m))
        seg = input_rows_segment(K, V, idx, logw, logw.copy(), "uniform")
        return Built([seg], info={"kept": m})

    def build_torch(self, K, V, level, ctx):
        import torch  # noqa: PLC0415  (torch path only)

        H, n, _ = K.shape
        m = kept_count(level["keep"], n)
        keys = host_uniforms(ctx.rng, (H, n), K)  # the reference's draws, so the same tokens
        idx = torch.sort(torch.sort(keys, dim=-1, stable=True).indices[:, :m], dim=-1).values
        logw = torch.full((H, m), float(np.log(n / m)), dtype=K.dtype, device=K.device)
        seg = input_rows_segment(K, V, idx, logw, logw.clone(), "uniform")
        return Built([seg], info={"kept": m})
