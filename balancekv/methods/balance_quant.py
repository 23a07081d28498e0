"""``balance+quant``: BalanceKV selection, then low-bit storage of the kept tokens (SPEC section 8).

More tokens at lower precision: the practical BalanceKV of SPEC 4b
(:class:`balancekv.methods.balance.Balance`, built through the registry) picks the
kept tokens and their weights; their keys and values are then stored as
``bits``-bit codes (keys per channel in groups of ``group`` tokens, values per
token in groups of ``group`` channels, fp16 scale and zero) by a
:class:`balancekv.quantized.QuantizedStream`. With ``policy="minikv"`` (default)
every kept token is quantized except the remainder ``m % group``; with
``policy="kivi"`` the last ``residual`` tokens stay in full precision. Weights
(``log 2^T`` for the compressed middle) are single-set and billed as usual.

Both paths: ``balance``'s own build for the kind of ``K`` (NumPy reference or torch), then
a :class:`~balancekv.quantized.QuantizedStream` of the same kind.

Only the consistent estimator is offered (quantized single-set storage). The
logit and attention bounds of :mod:`balancekv.bounds.quantization` compare this
cache with the unquantized BalanceKV cache it came from (Theorem Q3 holds for
any single-set weights).

Levels for ``eps``: BalanceKV kept fractions times bits 8, 4, 2, ordered by
estimated size ``keep * (bits + 32/group) / 16`` (``keep`` an upper bound on the kept fraction).
"""

from __future__ import annotations

from dataclasses import replace

from ..quantized import QuantizedStream, check_policy_options
from . import get_method
from .base import Built, Method

QUANT_OPTIONS = {"bits": 4, "group": 32, "residual": 128, "policy": "minikv", "scale_dtype": "float16"}


def _balance():
    return get_method("balance")


class BalanceQuant(Method):
    name = "balance+quant"

    @property
    def defaults(self):
        bal = {k: v for k, v in _balance().defaults.items() if k != "estimator"}
        return {**bal, **QUANT_OPTIONS}

    def split(self, opts):
        return ({k: v for k, v in opts.items() if k not in QUANT_OPTIONS}, {k: opts[k] for k in QUANT_OPTIONS})

    def check_options(self, opts):
        bopts, q = self.split(opts)
        _balance().check_options({**bopts, "estimator": "consistent"})
        check_policy_options(q["bits"], q["group"], q["residual"], q["policy"], q["scale_dtype"])

    def balance_opts(self, opts):
        return {**self.split(opts)[0], "estimator": "consistent"}

    def uses_queries(self, opts, queries_given):
        return _balance().uses_queries(self.balance_opts(opts), queries_given)

    def levels(self, n, opts):
        est = lambda lv: lv["keep"] * (lv["bits"] + 32.0 / opts["group"])
        out = [
            {"keep": lv["keep"], "bits": b} for lv in _balance().levels(n, self.balance_opts(opts)) for b in (8, 4, 2)
        ]
        return sorted(out, key=est, reverse=True)

    def level_chains(self, levels):
        """The ``eps`` search's ladders (:func:`balancekv.budget.level_chains`): one per bits, kept fraction
        decreasing (the error grows along each; across bits the byte order interleaves them)."""
        bits = sorted({lv["bits"] for lv in levels}, reverse=True)
        return [[i for i, lv in enumerate(levels) if lv["bits"] == b] for b in bits]

    def level_for_keep(self, keep, n, opts):
        return {"keep": float(keep), "bits": int(opts["bits"])}

    def rng_level(self, level):
        """The balance walk's randomness depends on the kept fraction only: the levels of one kept fraction
        (8, 4, 2 bits) quantize the same balance build."""
        return {"keep": level["keep"]}

    def build_many(self, K, V, requests):
        """The balance builds of every request together (:meth:`Balance.build_many`, one per kept fraction and
        probe set: the bits share it, :meth:`rng_level`), then each quantized at its bits."""
        inner, slot, which = [], {}, []
        for lv, ctx in requests:
            key = (lv["keep"], id(ctx.probes), None if ctx.probe_rows is None else tuple(ctx.probe_rows))
            if key not in slot:
                slot[key] = len(inner)
                inner.append(({"keep": lv["keep"]}, replace(ctx, opts=self.balance_opts(ctx.opts))))
            which.append(slot[key])
        balance = _balance().build_many(K, V, inner)
        seen, out = set(), []
        for j, (lv, ctx) in zip(which, requests):
            out.append(self._quantize(balance[j], lv, ctx, copy=j in seen))  # a stream owns its arrays
            seen.add(j)
        return out

    def _build(self, K, V, level, ctx):
        return self.build_many(K, V, [(level, ctx)])[0]

    def _quantize(self, built, level, ctx, copy: bool = False):
        _, q = self.split(ctx.opts)
        (seg,) = built.segments
        own = (lambda x: x.clone() if hasattr(x, "clone") else x.copy()) if copy else (lambda x: x)
        stream = QuantizedStream(
            own(seg.keys.dense()),
            own(seg.values.dense()),
            own(seg.positions),
            own(seg.num_logw),
            bits=level["bits"],
            group=q["group"],
            residual=q["residual"],
            policy=q["policy"],
            scale_dtype=q["scale_dtype"],
            label=f"balance+quant{level['bits']}",
            backend=ctx.backend,
        )
        return Built(
            stream.segments(), stream=stream, info={**built.info, "bits": level["bits"], "quantized_keys": stream.nk}
        )

    build_reference = _build
    build_torch = _build
