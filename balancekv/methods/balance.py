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

Defaults: ``gamma=4, a2=0, temp=1, block=64, sink=32, window=32,
kernel="auto", value_centering="auto"``. ``kernel="auto"`` uses the query-aware
``queries`` kernel when ``queries`` were given to ``compress`` and the authors'
``keys`` kernel otherwise; ``value_centering="auto"`` is True with the
``queries`` kernel and False with the ``keys`` kernel. Chosen on real SmolLM2
captures of the TUNING text only (``benchmarks/balance_real_tuning.py``,
``benchmarks/results/balance_tuning_numpy-license.md``): with observed queries,
the value-centred ``queries`` kernel had the lowest error relative to
``uniform-halving`` of the grid, best at ``a2=0, block=64`` (the authors used
``a2=0.025, block=128``; ``uniform-halving`` shares ``block``); without queries, the keys kernel without value
centring is what the synthetic families favour (``benchmarks/balance_kernel_choice.py``;
value centring, and the queries kernel fed with the fallback key probes, both
lost to ``uniform-halving`` on the ``llm`` family). The walk itself is looked up with
``balancekv.backends.resolve("blocked_walk_signs", ctx.backend)``, so a fast
implementation with identical semantics plugs in.

Kernel. ``kernel="keys"`` (the authors' kernel on centred keys, SPEC 4b) or
``kernel="queries"``: the query-aware kernel of
:func:`~balancekv.reference.blocked_balance.blocked_walk_signs` built from the
observed queries ``ctx.probes`` (the ``queries`` given to ``compress``; without
them, the probes ``compress`` falls back to, i.e. the last keys). The
``queries`` kernel always runs the NumPy reference walk (the fast walk implements
only the keys kernel), whatever ``backend``.

The gamma-walk clips ``p`` to ``[0, 1]`` and cannot FAIL, so ``retries`` and
``fallbacks`` are always 0 here (the theory walk of ``balance-stream`` can FAIL).
"""
from __future__ import annotations

import numpy as np

from balancekv.backends import resolve
from balancekv.reference.blocked_balance import KERNELS, blocked_balance, blocked_walk_signs, halving_sizes

from ..storage import dense_segment, gather_tokens
from .base import Built, Method, check_float_option, check_int_option

ESTIMATORS = ("consistent", "published")


class Balance(Method):
    name = "balance"
    defaults = {"value_centering": "auto", "gamma": 4.0, "temp": 1.0, "beta": 0.0, "a2": 0.0,
                "block": 64, "sink": 32, "window": 32, "estimator": "consistent", "kernel": "auto"}
    fixed_gamma: float | None = None

    def check_options(self, opts):
        vc = opts["value_centering"]
        if not (isinstance(vc, (bool, np.bool_)) or (isinstance(vc, str) and vc == "auto")):
            raise TypeError(f"option value_centering must be a bool or 'auto', got {vc!r}")
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
        if opts["kernel"] not in ("auto",) + KERNELS:
            raise ValueError(f"option kernel must be one of {('auto',) + KERNELS}, got {opts['kernel']!r}")

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

    @staticmethod
    def resolved_kernel(opts, queries_given: bool) -> tuple[str, bool]:
        """``(kernel, value_centering)`` after resolving ``"auto"`` (see the module docstring)."""
        kernel = opts["kernel"]
        if kernel == "auto":
            kernel = "queries" if queries_given else "keys"
        vc = opts["value_centering"]
        if isinstance(vc, str):  # "auto"
            vc = kernel == "queries"
        return kernel, bool(vc)

    def build(self, K, V, level, ctx):
        opts = ctx.opts
        H, n, _ = K.shape
        T = int(level["itrs"])
        kernel, vc = self.resolved_kernel(opts, ctx.queries_given)
        if self.gamma(opts) == 0.0:
            kernel = "keys"  # gamma = 0 gives p = 1/2 whatever the kernel: same signs, fast walk
        extra = {}
        if kernel == "queries":
            walk = blocked_walk_signs  # reference only: the fast walk implements the keys kernel
            extra = {"kernel": "queries", "probes": ctx.probes}
        else:
            walk = resolve("blocked_walk_signs", ctx.backend)
        idx, lw = blocked_balance(K, V, itrs=T, block=opts["block"], sink=opts["sink"], window=opts["window"],
                                  scale=ctx.scale, rng=ctx.rng, gamma=self.gamma(opts), temp=opts["temp"],
                                  beta=opts["beta"], a2=opts["a2"], value_centering=vc,
                                  walk_signs=walk, **extra)
        den = lw.copy()
        if opts["estimator"] == "published":
            s0 = min(opts["sink"], n)
            w0 = min(opts["window"], n - s0)
            mid = (idx >= s0) & (idx < n - w0)
            den = np.where(mid, T * np.log(2.0), 0.0)
        seg = dense_segment(gather_tokens(K, idx), gather_tokens(V, idx), lw, den, idx, self.name)
        m = idx.shape[1]
        return Built([seg], info={"kept": m, "keep_effective": m / n, "itrs": T, "retries": 0, "fallbacks": 0,
                                  "kernel": kernel, "value_centering": vc})


class UniformHalving(Balance):
    """SPEC 4c: the 4b procedure with ``gamma = 0`` (fair coin signs), the authors' uniform baseline."""

    name = "uniform-halving"
    defaults = {k: v for k, v in Balance.defaults.items() if k != "gamma"}
    fixed_gamma = 0.0
