"""``quant``: KIVI-style ``b``-bit quantization of the whole cache [KIVI] (SPEC section 6).

Keys per channel in groups of ``group`` consecutive tokens, values per token in
groups of ``group`` channels, scale and zero in ``scale_dtype`` (fp16), with a
full-precision residual window of ``residual`` tokens handled by the decode
policy ``policy`` (``"kivi"``, ``"kivi-batched"`` or ``"minikv"``; see :mod:`balancekv.quantized`).

Every token is kept, so ``keep < 1`` is refused; ``keep=1`` stores at ``bits``.
In ``eps`` mode the levels are 8, 4 and 2 bits (least to most compressed).
Deterministic error bounds: :mod:`balancekv.bounds.quantization`. Both paths: the
reference quantizer on NumPy, :func:`balancekv.fast.quantization.quantize_pack` on torch
(Triton on CUDA), bit-identical codes.
"""

from __future__ import annotations

import numpy as np

from .._arrays import is_torch, torch
from ..quantized import QuantizedStream, check_policy_options
from .base import Built, Method


class Quant(Method):
    name = "quant"
    defaults = {"bits": 2, "group": 32, "residual": 128, "policy": "kivi", "scale_dtype": "float16"}
    selects_tokens = False

    def check_options(self, opts):
        check_policy_options(opts["bits"], opts["group"], opts["residual"], opts["policy"], opts["scale_dtype"])

    def levels(self, n, opts):
        return [{"bits": 8}, {"bits": 4}, {"bits": 2}]

    def level_for_keep(self, keep, n, opts):
        if keep != 1:
            raise ValueError(f"method 'quant' keeps every token; keep must be 1, got {keep}")
        return {"bits": int(opts["bits"])}

    def _build(self, K, V, level, ctx):
        o = ctx.opts
        n = K.shape[-2]
        pos = torch.arange(n, device=K.device) if is_torch(K) else np.arange(n)
        stream = QuantizedStream(
            K,
            V,
            pos,
            bits=level["bits"],
            group=o["group"],
            residual=o["residual"],
            policy=o["policy"],
            scale_dtype=o["scale_dtype"],
            label=f"quant{level['bits']}",
            backend=ctx.backend,
        )
        return Built(
            stream.segments(),
            stream=stream,
            info={"bits": level["bits"], "quantized_keys": stream.nk, "quantized_values": stream.nv},
        )

    build_reference = _build
    build_torch = _build
