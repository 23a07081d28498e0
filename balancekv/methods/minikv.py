"""``minikv``: H2O selection with pyramid layer budgets + 2-bit KIVI storage [MINI, arXiv 2411.18077].

SPEC section 7. Per head, keep the ``recent`` most recent tokens and the
``heavy`` highest-scoring earlier ones by H2O's accumulated attention
(:func:`balancekv.reference.selection.h2o_scores`; queries, blocked scoring once per
``compress`` call and both paths as in :mod:`balancekv.methods.h2o`: the caller's
``queries`` if given, else the keys themselves), then store the kept tokens with the ``"minikv"`` decode policy of
:mod:`balancekv.quantized`: ``bits``-bit codes (keys per channel, values per
token, groups of ``group=16``, fp16 scale and zero), everything quantized but
the remainder ``m % group``; decode tokens are flushed in blocks of ``residual``.

Budgets. The mean kept ratio is ``h = heavy + recent`` (MiniKV: 0.25 + 0.25),
or ``keep`` when given (split between heavy and recent in the same proportion).
MiniKV is layer-discriminative: layer ``l`` of ``L`` keeps
``pyramid_budgets(h, L, beta)[l]`` (``beta = 7``). One ``compress`` call sees one
layer, so pass ``layer=l, layers=L`` to get that layer's pyramid budget; without
them (the default) the layer keeps the mean ratio ``h``.

Bytes are billed honestly: with ``bits=2``, ``group=16`` and fp16 scale and zero,
4 bits per element of every quantized token, fp16 for the remainder.

Levels for ``eps`` (budgets and bits): kept fractions ``1/2, 1/4, …`` times bits
8, 4, 2, ordered by their estimated size ``keep * (bits + 32/group) / 16``.
"""

from __future__ import annotations

from balancekv.reference.selection import pyramid_budgets

from ..quantized import QuantizedStream, check_policy_options
from ..storage import gather_tokens
from .base import Built, Method, check_float_option, check_int_option, halving_levels, kept_count
from .h2o import check_sink_option, h2o_scores_once, select_top, sink_count


def bits_budget_levels(keeps: list[float], group: int, key: str = "keep") -> list[dict]:
    """Every (budget, bits) pair, least to most compressed by estimated size (fp16 scale and zero)."""
    est = lambda lv: lv[key] * (lv["bits"] + 32.0 / group)
    levels = [{key: k, "bits": b} for k in keeps for b in (8, 4, 2)]
    return sorted(levels, key=est, reverse=True)


class MiniKV(Method):
    name = "minikv"
    defaults = {
        "heavy": 0.25,
        "recent": 0.25,
        "bits": 2,
        "group": 16,
        "residual": 128,
        "layer": None,
        "layers": None,
        "beta": 7.0,
        "scale_dtype": "float16",
        "sink": "auto",
    }

    def check_options(self, opts):
        check_float_option(opts, "heavy", 0.0, 1.0)
        check_float_option(opts, "recent", 0.0, 1.0)
        if not 0 < opts["heavy"] + opts["recent"] <= 1:
            raise ValueError(f"options heavy + recent must lie in (0, 1], got {opts['heavy'] + opts['recent']}")
        check_policy_options(opts["bits"], opts["group"], opts["residual"], "minikv", opts["scale_dtype"])
        check_float_option(opts, "beta", 1.0)
        check_sink_option(opts)
        if (opts["layer"] is None) != (opts["layers"] is None):
            raise ValueError("options layer and layers must be given together (or neither)")
        if opts["layers"] is not None:
            check_int_option(opts, "layers", 1)
            check_int_option(opts, "layer", 0)
            if opts["layer"] >= opts["layers"]:
                raise ValueError(f"option layer must be < layers={opts['layers']}, got {opts['layer']}")

    def uses_queries(self, opts, queries_given):
        return queries_given  # H2O scores: the queries if given, else the keys themselves

    def levels(self, n, opts):
        return bits_budget_levels([lv["keep"] for lv in halving_levels(n, min_kept=opts["group"])], opts["group"])

    def level_for_keep(self, keep, n, opts):
        return {"keep": float(keep), "bits": int(opts["bits"])}

    def token_budget(self, keep, n, opts):
        return kept_count(self.layer_ratio(keep, opts), n)  # the layer's pyramid budget

    def layer_ratio(self, mean_ratio: float, opts) -> float:
        if opts["layers"] is None:
            return float(mean_ratio)
        return float(pyramid_budgets(mean_ratio, opts["layers"], opts["beta"])[opts["layer"]])

    def _build(self, K, V, level, ctx):
        o = ctx.opts
        n = K.shape[-2]
        h = level.get("keep", o["heavy"] + o["recent"])
        m = kept_count(self.layer_ratio(h, o), n)
        recent = min(m, int(round(m * o["recent"] / (o["heavy"] + o["recent"]))))
        sink = sink_count(ctx)
        idx = select_top(h2o_scores_once(K, ctx), m, recent, sink)
        stream = QuantizedStream(
            gather_tokens(K, idx),
            gather_tokens(V, idx),
            idx,
            bits=level["bits"],
            group=o["group"],
            residual=o["residual"],
            policy="minikv",
            scale_dtype=o["scale_dtype"],
            label=f"minikv{level['bits']}",
            backend=ctx.backend,
        )
        return Built(
            stream.segments(),
            stream=stream,
            info={"kept": m, "recent": recent, "sink": sink, "bits": level["bits"], "quantized_keys": stream.nk},
        )

    build_reference = _build
    build_torch = _build
