"""``balance`` (practical blocked BalanceKV, SPEC 4b) and ``uniform-halving`` (its ``gamma = 0`` baseline, 4c).

Both run :func:`balancekv.reference.blocked_balance.blocked_balance`: sink and
window exact, the middle halved ``itrs`` times in blocks. ``uniform-halving``
uses fair coin signs (``gamma = 0``) through the same procedure, so comparing
the two at equal kept size isolates the effect of balancing.

Levels. Level ``{"itrs": T}`` halves the middle ``T`` times; the ``eps`` search
tries ``T = 1, 2, …`` while the middle still has at least 2 tokens before the
last round (a middle shorter than ``block`` forms one block).
``level_for_keep(keep)`` uses ``T = round(log2(1/keep))`` rounds on the middle
(``T = 0`` for ``keep > 1/sqrt(2)``: everything exact). The kept fraction of the
result is ``(sink + window + middle/2^T) / n`` — larger than ``keep`` when sink
and window are a large part of ``n``; the result reports the true count
(``Built.info["kept"]`` and ``CompressedKV.kept()``), never ``keep``.

Estimator. ``estimator="consistent"`` (default): one weight set for numerator
and denominator (SPEC section 1). ``estimator="published"`` reproduces the
authors' released decode path for comparison only: the numerator weights each
middle token by its weight, the denominator by ``2^T`` (``den_logw = T log 2``).

Defaults (the authors' published kernel: ``value_centering=False, gamma=4,
a2=0.025, temp=1, block=128, sink=32, window=32``) were chosen by measurement on
the synthetic families, see ``benchmarks/balance_kernel_choice.py``: value
centring tied or lost there (it lost on the ``llm`` family), so it is an option,
not the default, until real captures say otherwise. The walk itself is looked up with
``balancekv.backends.resolve("blocked_walk_signs", ctx.backend)``, so a fast
implementation with identical semantics plugs in.

The gamma-walk clips ``p`` to ``[0, 1]`` and cannot FAIL, so ``retries`` and
``fallbacks`` are always 0 here (the theory walk of ``balance-stream`` can FAIL).
"""
from __future__ import annotations

import numpy as np

from balancekv.backends import resolve
from balancekv.reference.blocked_balance import blocked_balance, halving_sizes

from ..storage import dense_segment, gather_tokens
from .base import Built, Method, check_float_option, check_int_option

ESTIMATORS = ("consistent", "published")


class Balance(Method):
    name = "balance"
    defaults = {"value_centering": False, "gamma": 4.0, "temp": 1.0, "beta": 0.0, "a2": 0.025,
                "block": 128, "sink": 32, "window": 32, "estimator": "consistent"}
    fixed_gamma: float | None = None

    def check_options(self, opts):
        if not isinstance(opts["value_centering"], (bool, np.bool_)):
            raise TypeError(f"option value_centering must be a bool, got {type(opts['value_centering']).__name__}")
        if "gamma" in opts:
            check_float_option(opts, "gamma", 0.0)
        check_float_option(opts, "temp", 0.0)
        check_float_option(opts, "beta")
        check_float_option(opts, "a2", 0.0)
        check_int_option(opts, "block", 2)
        check_int_option(opts, "sink", 0)
        check_int_option(opts, "window", 0)
        if opts["estimator"] not in ESTIMATORS:
            raise ValueError(f"option estimator must be one of {ESTIMATORS}, got {opts['estimator']!r}")

    # ----------------------------------------------------------------- levels
    @staticmethod
    def middle(n, opts) -> int:
        s0 = min(opts["sink"], n)
        return n - s0 - min(opts["window"], n - s0)

    def levels(self, n, opts):
        nm, out, T = self.middle(n, opts), [], 1
        while halving_sizes(nm, opts["block"], T - 1)[-1] >= 2:
            out.append({"itrs": T})
            T += 1
        return out

    def level_for_keep(self, keep, n, opts):
        T = int(round(np.log2(1.0 / keep)))
        return {"itrs": max(0, min(T, len(self.levels(n, opts))))}

    # ----------------------------------------------------------------- build
    def gamma(self, opts) -> float:
        return float(opts["gamma"]) if self.fixed_gamma is None else self.fixed_gamma

    def build(self, K, V, level, ctx):
        opts = ctx.opts
        H, n, _ = K.shape
        T = int(level["itrs"])
        walk = resolve("blocked_walk_signs", ctx.backend)
        idx, lw = blocked_balance(K, V, itrs=T, block=opts["block"], sink=opts["sink"], window=opts["window"],
                                  scale=ctx.scale, rng=ctx.rng, gamma=self.gamma(opts), temp=opts["temp"],
                                  beta=opts["beta"], a2=opts["a2"], value_centering=bool(opts["value_centering"]),
                                  walk_signs=walk)
        den = lw.copy()
        if opts["estimator"] == "published":
            s0 = min(opts["sink"], n)
            w0 = min(opts["window"], n - s0)
            mid = (idx >= s0) & (idx < n - w0)
            den = np.where(mid, T * np.log(2.0), 0.0)
        seg = dense_segment(gather_tokens(K, idx), gather_tokens(V, idx), lw, den, idx, self.name)
        m = idx.shape[1]
        return Built([seg], info={"kept": m, "keep_effective": m / n, "itrs": T, "retries": 0, "fallbacks": 0})


class UniformHalving(Balance):
    """SPEC 4c: the 4b procedure with ``gamma = 0`` (fair coin signs), the authors' uniform baseline."""

    name = "uniform-halving"
    defaults = {k: v for k, v in Balance.defaults.items() if k != "gamma"}
    fixed_gamma = 0.0
