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

Heavy hitters (``heavy_rounds``, default ``"auto"``: 2 when ``queries`` were given to
``compress``, else 0). With observed queries, the middle tokens with the largest probe
attention are kept exactly and the remaining middle is halved ``T + heavy_rounds`` rounds,
the number of heavy hitters chosen so that the total kept size equals the plain ``T``-round
run's. Eviction methods (SnapKV, H2O) keep the heavy hitters and *drop* the rest's mass;
here the walk estimates that mass. Chosen on the TUNING text (numpy-license): balance /
uniform-halving averaged over SmolLM2 layers 1, 2, 5, 15, 29 fell from 0.81/0.77/0.84/0.84
(heavy_rounds 0) to 0.19/0.28/0.38/0.50 (heavy_rounds 2) at rates 1/2..1/16, and the
worst layer against SnapKV at equal kept tokens to 0.67/0.75/0.83/0.92
(``python benchmarks/balance_real_tuning.py --stage heavy``). Max-pooling the scores
(``heavy_pool=7``, SnapKV's trick) was worse for attention error and is off by default.
``uniform-halving`` keeps ``heavy_rounds=0`` (the pure SPEC 4c baseline); with
``heavy_rounds > 0`` it isolates the walk's share of the hybrid's gain.

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

from .._arrays import is_torch
from ..storage import dense_segment, gather_tokens
from .base import Built, Method, check_float_option, check_int_option

ESTIMATORS = ("consistent", "published")


class Balance(Method):
    name = "balance"
    defaults = {
        "value_centering": "auto",
        "gamma": 4.0,
        "temp": 1.0,
        "beta": 0.0,
        "a2": 0.0,
        "block": 64,
        "sink": 32,
        "window": 32,
        "estimator": "consistent",
        "kernel": "auto",
        "heavy_rounds": "auto",
        "heavy_pool": 1,
    }
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
        if not (opts["heavy_rounds"] == "auto"):
            check_int_option(opts, "heavy_rounds", 0)
        check_int_option(opts, "heavy_pool", 1)
        if opts["heavy_pool"] % 2 == 0:
            raise ValueError(f"option heavy_pool must be odd (same-length max pooling), got {opts['heavy_pool']}")
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

    def build_reference(self, K, V, level, ctx):
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
        r = self.resolved_heavy_rounds(opts, ctx.queries_given)
        protect, T_rest = None, T
        if r > 0 and T > 0:
            protect, T_rest = self.heavy_hitters(K, T, r, opts, ctx)
        idx, lw = blocked_balance(
            K,
            V,
            itrs=T_rest,
            block=opts["block"],
            sink=opts["sink"],
            window=opts["window"],
            scale=ctx.scale,
            rng=ctx.rng,
            gamma=self.gamma(opts),
            temp=opts["temp"],
            beta=opts["beta"],
            a2=opts["a2"],
            value_centering=vc,
            walk_signs=walk,
            protect=protect,
            **extra,
        )
        den = lw.copy()
        if opts["estimator"] == "published":
            s0 = min(opts["sink"], n)
            w0 = min(opts["window"], n - s0)
            mid = (idx >= s0) & (idx < n - w0)
            den = np.where(mid, T * np.log(2.0), 0.0)
        seg = dense_segment(gather_tokens(K, idx), gather_tokens(V, idx), lw, den, idx, self.name)
        m = idx.shape[1]
        return Built(
            [seg],
            info={
                "kept": m,
                "keep_effective": m / n,
                "itrs": T,
                "retries": 0,
                "fallbacks": 0,
                "kernel": kernel,
                "value_centering": vc,
                "heavy": 0 if protect is None else int(protect.shape[1]),
            },
        )

    def build_torch(self, K, V, level, ctx):
        """The same build on torch tensors (device-native: walk, heavy hitters, gathers in torch)."""
        import torch  # noqa: PLC0415  (torch path only)

        from balancekv.fast.blocked_balance import blocked_balance as fast_blocked_balance  # noqa: PLC0415

        opts = ctx.opts
        H, n, _ = K.shape
        T = int(level["itrs"])
        kernel, vc = self.resolved_kernel(opts, ctx.queries_given)
        if self.gamma(opts) == 0.0:
            kernel = "keys"  # gamma = 0 gives p = 1/2 whatever the kernel: the same signs
        r = self.resolved_heavy_rounds(opts, ctx.queries_given)
        protect, T_rest = None, T
        if r > 0 and T > 0:
            protect, T_rest = self.heavy_hitters(K, T, r, opts, ctx)
        idx, lw = fast_blocked_balance(
            K,
            V,
            itrs=T_rest,
            block=opts["block"],
            sink=opts["sink"],
            window=opts["window"],
            scale=ctx.scale,
            rng=ctx.rng,
            gamma=self.gamma(opts),
            temp=opts["temp"],
            beta=opts["beta"],
            a2=opts["a2"],
            value_centering=vc,
            kernel=kernel,
            probes=ctx.probes if kernel == "queries" else None,
            protect=protect,
            backend="triton" if ctx.backend == "triton" else ("auto" if ctx.backend == "auto" else "torch"),
        )
        den = lw
        if opts["estimator"] == "published":
            s0 = min(opts["sink"], n)
            w0 = min(opts["window"], n - s0)
            mid = (idx >= s0) & (idx < n - w0)
            den = torch.where(mid, torch.full_like(lw, T * float(np.log(2.0))), torch.zeros_like(lw))
        seg = dense_segment(gather_tokens(K, idx), gather_tokens(V, idx), lw, den.clone(), idx, self.name)
        m = idx.shape[1]
        return Built(
            [seg],
            info={
                "kept": m,
                "keep_effective": m / n,
                "itrs": T,
                "retries": 0,
                "fallbacks": 0,
                "kernel": kernel,
                "value_centering": vc,
                "heavy": 0 if protect is None else int(protect.shape[1]),
            },
        )

    # ----------------------------------------------------------------- heavy hitters
    @staticmethod
    def resolved_heavy_rounds(opts, queries_given: bool) -> int:
        r = opts["heavy_rounds"]
        if r == "auto":
            return 2 if queries_given else 0
        return int(r)

    def heavy_hitters(self, K, T, r, opts, ctx):
        """``(protect (H, h), rounds)``: the top-``h`` middle tokens by probe attention, and the halving
        rounds for the rest, chosen so that ``h + halving_sizes(M - h, block, T + r)`` matches the
        ``halving_sizes(M, block, T)`` tokens a plain ``T``-round run keeps.

        Scores: ``sum_l softmax(scale * <p_l, k_i>)`` over the probe queries ``p_l`` (``ctx.probes``:
        the ``queries`` given to ``compress``, else the last keys), the softmax over all ``n`` tokens,
        optionally max-pooled along positions (``heavy_pool``, SnapKV's trick). Heavy hitters are
        kept exactly; balancing then estimates the mass of the rest, which eviction would drop.
        """
        H, n, _ = K.shape
        s0 = min(opts["sink"], n)
        w0 = min(opts["window"], n - s0)
        M, blk = n - s0 - w0, opts["block"]
        target = halving_sizes(M, blk, T)[-1]
        R = T + r
        h = int(np.floor((target - M / 2**R) / (1 - 2.0**-R)))
        h = max(0, min(h, target))
        while h > 0 and h + halving_sizes(M - h, blk, R)[-1] > target:
            h -= 1
        if h == 0:
            return None, T
        k = int(opts["heavy_pool"])
        if is_torch(K):
            import torch  # noqa: PLC0415  (torch path only)
            import torch.nn.functional as F  # noqa: PLC0415

            score = torch.softmax(ctx.scale * (ctx.probes @ K.transpose(-1, -2)), dim=-1).sum(1)[:, s0 : n - w0]
            if k > 1:
                score = F.max_pool1d(score[:, None], k, stride=1, padding=k // 2)[:, 0]
            top = torch.sort(-score, dim=1, stable=True).indices[:, :h] + s0
            return torch.sort(top, dim=1).values, R
        a = ctx.scale * np.einsum("hld,hnd->hln", ctx.probes, K)
        a -= a.max(axis=-1, keepdims=True)
        p = np.exp(a)
        score = (p / p.sum(axis=-1, keepdims=True)).sum(axis=1)[:, s0 : n - w0]
        if k > 1:
            pad = np.full((H, k // 2), -np.inf)
            sp = np.concatenate([pad, score, pad], axis=1)
            score = np.max(np.stack([sp[:, t : t + M] for t in range(k)], axis=-1), axis=-1)
        top = np.argsort(-score, axis=1, kind="stable")[:, :h] + s0
        return np.sort(top, axis=1), R


class UniformHalving(Balance):
    """SPEC 4c: the 4b procedure with ``gamma = 0`` (fair coin signs), the authors' uniform baseline."""

    name = "uniform-halving"
    # the pure baseline of SPEC 4c: no heavy-hitter protection unless asked for
    defaults = {**{k: v for k, v in Balance.defaults.items() if k != "gamma"}, "heavy_rounds": 0}
    fixed_gamma = 0.0
