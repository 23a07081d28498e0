"""``balance`` (practical blocked BalanceKV, SPEC 4b) and ``uniform-halving`` (its ``gamma = 0`` baseline, 4c).

What: per head, the first ``sink`` and last ``window`` tokens stay exact and the middle is halved
by self-balancing walks in blocks (:func:`balancekv.reference.blocked_balance.blocked_balance`, the
definition; :func:`balancekv.fast.blocked_balance.blocked_balance` on torch). ``uniform-halving``
runs the same procedure with fair coins (``gamma = 0``), so the two at equal kept size isolate the
effect of balancing.

Budget (:meth:`Balance.plan`). ``keep=f`` keeps at most ``ceil(f n)`` tokens: sink and window take
at most a quarter of the budget each, the middle gets the fewest rounds whose halved size fits, and
the slack is filled with exact tokens — heavy hitters when observed ``queries`` were given
(``heavy_rounds`` more rounds free the room: eviction methods keep heavy hitters and drop the rest's
mass, here the walk estimates it), otherwise the tokens just before the window. The ``eps`` search
tries the kept fractions ``1/2, 1/4, ...`` (the same caches keep builds), least compressed first; on
torch the builds it asks for at once run in lockstep (:meth:`Balance.build_many`). The levels are not
nested (each kept fraction has its own heavy-hitter count, rounds and generator), so a level's walk is
not a snapshot of another's; what does not depend on the level (heavy-hitter scores, the probes' logits)
is computed once per call. ``{"itrs": T}`` levels (exactly ``T`` rounds) remain for experiments.

Why the defaults differ with and without queries (``"auto"`` options, :attr:`Balance.PRESETS`):
with observed queries the query-aware kernel (the walk balances the errors on those queries) with
value centring was best on real SmolLM2 captures of the tuning text; without queries a key-space
kernel has to stand in for every query, and the drift normalised per token with relative joint
balancing was best on the synthetic families. The measurements and their commands are in
``benchmarks/README.md`` (BalanceKV kernel choices, default ``balance`` without queries, fig1).

Estimator: ``"consistent"`` (default) uses one weight set for numerator and denominator (SPEC 1);
``"published"`` reproduces the authors' released decode path (denominator weight ``2^T`` for every
halved-middle token) for comparison only. The gamma-walk clips ``p`` to ``[0, 1]`` and cannot
FAIL, so ``retries`` and ``fallbacks`` are 0 (the theory walk of ``balance-stream`` can FAIL).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from balancekv.backends import resolve
from balancekv.reference.blocked_balance import (
    A2_MODES,
    GAMMA_NORMS,
    HALVINGS,
    KERNELS,
    blocked_balance,
    blocked_walk_signs,
    halving_sizes,
)

from .._arrays import is_torch, torch
from ..storage import input_rows_segment
from .balance_stream import BalanceStream, capped_stream, check_cap_options
from .base import Built, Method, check_float_option, check_int_option, halving_levels, top_tokens

ESTIMATORS = ("consistent", "published")


class Balance(Method):
    name = "balance"
    defaults = {
        "value_centering": "auto",
        "gamma": "auto",
        "temp": "auto",
        "beta": 0.0,
        "a2": "auto",
        "block": "auto",
        "sink": 32,
        "window": 32,
        "estimator": "consistent",
        "kernel": "auto",
        "heavy_rounds": "auto",
        "heavy_pool": 1,
        "gamma_norm": "auto",
        "a2_mode": "auto",
        "halving": "block",
        "cap_window": 0.15,
        "cap_window_min": 64,
        "cap_heavy": 0.2,
        "cap_sink": 4,
        "cap_t": 32,
    }
    fixed_gamma: float | None = None
    #: what ``"auto"`` options resolve to with observed ``queries`` (tuned on SmolLM2 captures of the
    #: tuning text: the query-aware kernel) and without (the keys kernel, drift normalised per token,
    #: relative joint balancing; chosen on the synthetic families and the tuning text). The evidence:
    #: ``benchmarks/README.md`` (balance defaults) and ``benchmarks/balance_default_choice.py``.
    PRESETS = {
        True: {"gamma": 4.0, "temp": 1.0, "a2": 0.0, "block": 64, "gamma_norm": "none", "a2_mode": "abs"},
        False: {"gamma": 64.0, "temp": 0.25, "a2": 1.0, "block": 256, "gamma_norm": "token", "a2_mode": "rel"},
    }

    def concrete(self, opts, queries_given: bool) -> dict:
        """``opts`` with every ``"auto"`` resolved for this call (``PRESETS``; ``kernel``, ``value_centering``
        and ``heavy_rounds`` as in :meth:`resolved_kernel` and :meth:`resolved_heavy_rounds`)."""
        out = dict(opts)
        for k, v in self.PRESETS[bool(queries_given)].items():
            if out.get(k, "auto") == "auto":
                out[k] = v
        return out

    def check_options(self, opts):
        vc = opts["value_centering"]
        if not (isinstance(vc, (bool, np.bool_)) or (isinstance(vc, str) and vc == "auto")):
            raise TypeError(f"option value_centering must be a bool or 'auto', got {vc!r}")
        auto = lambda k: isinstance(opts.get(k), str) and opts[k] == "auto"
        if "gamma" in opts and not auto("gamma"):
            check_float_option(opts, "gamma", 0.0)
        for k in ("temp", "a2"):
            if not auto(k):
                check_float_option(opts, k, 0.0)
        check_float_option(opts, "beta")
        if not auto("block"):
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
        for k, allowed in (("gamma_norm", GAMMA_NORMS), ("a2_mode", A2_MODES), ("halving", HALVINGS)):
            if opts[k] not in (("auto",) if k != "halving" else ()) + tuple(allowed):
                raise ValueError(f"option {k} must be one of {('auto',) + tuple(allowed)}, got {opts[k]!r}")
        if "cap_window" in opts:
            check_cap_options(opts)
            check_int_option(opts, "cap_sink", 0)
            check_int_option(opts, "cap_window_min", 0)
            check_int_option(opts, "cap_t", 1)

    # ----------------------------------------------------------------- levels
    @staticmethod
    def middle(n, opts) -> int:
        s0 = min(opts["sink"], n)
        return n - s0 - min(opts["window"], n - s0)

    def levels(self, n, opts):
        """Kept fractions ``1/2, 1/4, …`` (budgets ``ceil(n/2^j)``, at least one token), as ``keep`` uses."""
        return halving_levels(n)

    def level_for_keep(self, keep, n, opts):
        return {"keep": float(keep)}

    @staticmethod
    def fill(target: int, M: int, blk: int, R: int, halving: str = "block") -> int:
        """The most exact tokens ``h`` with ``h + halving_sizes(M - h, blk, R)[-1] <= target``."""
        h = int(np.floor((target - M / 2**R) / (1 - 2.0**-R))) if R > 0 else target
        h = max(0, min(h, target, M))
        while h > 0 and h + halving_sizes(M - h, blk, R, halving)[-1] > target:
            h -= 1
        while h < min(target, M) and h + 1 + halving_sizes(M - h - 1, blk, R, halving)[-1] <= target:
            h += 1
        return h

    def plan(self, n: int, level: dict, opts, queries_given: bool) -> tuple[int, int, int, int]:
        """``(sink, window, rounds, h)``: exact sink and window, halving rounds on the middle, and ``h``
        middle tokens kept exactly besides (heavy hitters with queries, else the tokens just before the
        window).

        ``{"keep": f}``: at most ``B = ceil(f n)`` tokens in all — sink and window (each at most B/4), the
        middle's share ``b`` is met with the fewest rounds ``T`` whose halved size fits, and the slack
        is filled with exact tokens (with queries, ``heavy_rounds`` more rounds free room for heavy
        hitters). ``{"itrs": T}``: exactly ``T`` rounds on the middle (the hybrid keeps the ``T``-round
        size with ``T + heavy_rounds`` rounds and heavy hitters).
        """
        blk = opts["block"]
        r = self.resolved_heavy_rounds(opts, queries_given)
        if "itrs" in level:
            s0 = min(opts["sink"], n)
            w0 = min(opts["window"], n - s0)
            M, T = n - s0 - w0, int(level["itrs"])
            if r == 0 or T == 0:
                return s0, w0, T, 0
            hv = opts["halving"]
            return s0, w0, T + r, self.fill(halving_sizes(M, blk, T, hv)[-1], M, blk, T + r, hv)
        B = min(n, max(1, int(np.ceil(level["keep"] * n - 1e-9))))
        # sink and window take at most a quarter of the budget each, so the middle is never evicted
        s0 = min(opts["sink"], B // 4, n)
        w0 = min(opts["window"], B // 4, n - s0)
        M, b = n - s0 - w0, B - s0 - w0
        if M <= b:
            return s0, n - s0, 0, 0  # everything fits: exact
        T = 1
        while halving_sizes(M, blk, T, opts["halving"])[-1] > b:
            T += 1  # terminates: halving reaches one token and b >= 1
        R = T + r
        return s0, w0, R, self.fill(b, M, blk, R, opts["halving"])

    def uses_queries(self, opts, queries_given):
        """Heavy hitters (with queries) and the queries kernel read the probes."""
        kernel, _ = self._kernel(self.concrete(opts, queries_given), queries_given)
        return kernel == "queries" or (queries_given and self.resolved_heavy_rounds(opts, queries_given) > 0)

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

    def _kernel(self, opts, queries_given):
        kernel, vc = self.resolved_kernel(opts, queries_given)
        if self.gamma(opts) == 0.0:
            kernel = "keys"  # gamma = 0 gives p = 1/2 whatever the kernel: the same signs
        return kernel, vc

    def _finish(self, K, V, idx, lw, level, plan, protect, kernel, vc, ctx):
        """The segment and info of a build (either path): gathered tokens, weights, the estimator."""
        opts = ctx.opts
        n = K.shape[1]
        s0, w0, R, h = plan
        den = lw
        if opts["estimator"] == "published":  # numerator by token weight, denominator 2^R (comparison only)
            mid = (idx >= s0) & (idx < n - w0)
            if protect is not None:  # per head: a token another head holds as a heavy hitter is walked here
                mid = mid & ~(idx[..., :, None] == protect[..., None, :]).any(-1)
            if is_torch(idx):
                import torch  # noqa: PLC0415  (torch path only)

                den = torch.where(mid, torch.full_like(lw, R * float(np.log(2.0))), torch.zeros_like(lw))
            else:
                den = np.where(mid, R * np.log(2.0), 0.0)
        den = den.clone() if is_torch(den) else den.copy()
        seg = input_rows_segment(K, V, idx, lw, den, self.name)
        m = idx.shape[1]
        info = {
            "kept": m,
            "keep_effective": m / n,
            "rounds": R,
            "sink": s0,
            "window": w0,
            "exact_extra": h,
            "retries": 0,
            "fallbacks": 0,
            "kernel": kernel,
            "value_centering": vc,
        }
        return Built([seg], info=info)

    def _walk_options(self, opts, vc, s0, w0, R, ctx) -> dict:
        """The keyword arguments of ``blocked_balance`` both paths share."""
        return dict(
            itrs=R,
            block=opts["block"],
            sink=s0,
            window=w0,
            scale=ctx.scale,
            rng=ctx.rng,
            gamma=self.gamma(opts),
            temp=opts["temp"],
            beta=opts["beta"],
            a2=opts["a2"],
            value_centering=vc,
            halving=opts["halving"],
            gamma_norm=opts["gamma_norm"],
            a2_mode=opts["a2_mode"],
        )

    def build_reference(self, K, V, level, ctx):
        opts = self.concrete(ctx.opts, ctx.queries_given)
        kernel, vc = self._kernel(opts, ctx.queries_given)
        plan = s0, w0, R, h = self.plan(K.shape[1], level, opts, ctx.queries_given)
        extra = {}
        if kernel == "queries":
            walk = blocked_walk_signs  # the reference walk (the definition)
            extra = {"kernel": "queries", "probes": ctx.probes}
        else:
            walk = resolve("blocked_walk_signs", ctx.backend)
        protect = self.extra_exact(K, s0, w0, h, ctx) if h else None
        idx, lw = blocked_balance(
            K, V, walk_signs=walk, protect=protect, **self._walk_options(opts, vc, s0, w0, R, ctx), **extra
        )
        return self._finish(K, V, idx, lw, level, plan, protect, kernel, vc, ctx)

    def build_torch(self, K, V, level, ctx):
        """The same build on torch tensors (device-native: walk, heavy hitters, gathers in torch)."""
        return self.build_many(K, V, [(level, ctx)])[0]

    def build_many(self, K, V, requests):
        """Torch: the builds run in lockstep (:func:`balancekv.fast.blocked_balance.lockstep`: one sign loop
        per round for all of them; each build keeps its own uniforms, kernel matrices and result). NumPy: the
        reference builds, one after the other."""
        if not is_torch(K):
            return super().build_many(K, V, requests)
        from balancekv.fast.blocked_balance import blocked_balance_rounds, lockstep  # noqa: PLC0415

        gens, rest = [], []
        for level, ctx in requests:
            opts = self.concrete(ctx.opts, ctx.queries_given)
            kernel, vc = self._kernel(opts, ctx.queries_given)
            plan = s0, w0, R, h = self.plan(K.shape[1], level, opts, ctx.queries_given)
            protect = self.extra_exact(K, s0, w0, h, ctx) if h else None
            logits = None
            if kernel == "queries":  # every level's walk reads the same logits: one matmul per call
                logits = self.memo(
                    ctx,
                    ("balance.query_logits", float(opts["temp"])),
                    K,
                    lambda c=ctx, t=opts["temp"]: self._logits(K, c, t),
                )
            gens.append(
                blocked_balance_rounds(
                    K,
                    V,
                    kernel=kernel,
                    probes=ctx.probes if kernel == "queries" else None,
                    logits=logits,
                    protect=protect,
                    backend=ctx.backend if ctx.backend in ("triton", "auto") else "torch",
                    **self._walk_options(opts, vc, s0, w0, R, ctx),
                )
            )
            rest.append((level, plan, protect, kernel, vc, ctx))
        return [self._finish(K, V, idx, lw, *r) for (idx, lw), r in zip(lockstep(gens), rest)]

    # ----------------------------------------------------------------- under a memory cap
    supports_cap = True

    def build_capped(self, K, V, cap, ctx):
        """Streaming ``balance`` under a cap: a :func:`~balancekv.methods.balance_stream.capped_stream`
        (exact sinks, sets of ``t`` weighted tokens, an exact recent window; see :func:`cap_layout`) whose
        oldest sets are this method's prefill build of the prompt's middle, at most the sets' room
        (``balance`` with the caller's options and queries, its own sink and window 0); during decoding
        tokens leaving the window form new sets, and adjacent sets are merged by the joint walk whenever
        the cap needs room (the walk options of ``balance-stream``). Options: ``cap_sink`` exact first tokens
        (default 4, StreamingLLM's; the prefill's ``sink`` of 32 would take an eighth of a small cap),
        ``cap_window`` the exact recent window's share of the cap (0.15) but at least ``cap_window_min`` tokens
        (64: a language model needs a local window of a few dozen tokens whatever the cap), ``cap_heavy`` the
        share of exact heavy hitters by accumulated decode attention (0.2, fed by :meth:`CompressedKV.observe`;
        a token leaving the window competes with them, the losers form the sets); the rest of the cap, about
        60% at cap 512, holds the balanced sets, of ``cap_t`` slots each (32, at most an eighth of the cap and
        small enough for 3 sets: sets of 16 and 64 were worse at cap 512, 32 better than 16 at cap 256). Chosen
        on the tuning text (``benchmarks/README.md``, "Long generation under a memory cap": more room for the
        sets and a smaller window beat the first shares 0.25 / 0.4 at cap 512, and a window under ~64 tokens
        lost at cap 256)."""
        if ctx.opts["estimator"] != "consistent":
            raise ValueError("cap: balance's capped policy needs estimator='consistent' (one weight set)")
        bs = BalanceStream.defaults
        H, n, _ = K.shape
        o = ctx.opts
        stream = capped_stream(
            K, V, cap, ctx, sink=o["cap_sink"], t=o["cap_t"], window_frac=o["cap_window"], heavy_frac=o["cap_heavy"],
            window_min=o["cap_window_min"], t_div=8, min_sets=3, walk={"gamma": bs["gamma"], "a2": bs["a2"]},
        )  # fmt: skip
        tp = is_torch(K)
        pos = torch.arange(n, device=K.device) if tp else np.arange(n)
        s0 = min(stream.sink, n)
        # a prompt under the cap is held exactly: its window takes the buffer's whole room (the window and one
        # block less a token) and what the sets cannot hold fills the heavy-hitter slots, which decode then ranks
        short = n <= cap
        w0 = min(stream.window + (stream.t - 1 if short else 0), n - s0)
        M, room = n - s0 - w0, stream.max_sets * stream.t
        over = min(M - room, stream.heavy) if short and M > room else 0
        M -= over
        info = {"cap": int(cap), "sink": s0, "window": stream.window, "t": stream.t, "prefill_middle": M}
        if s0:
            stream.extend(K[:, :s0], V[:, :s0], pos[:s0])
        if M > room:  # the middle compressed by this method to at most the sets' room
            mid_ctx = replace(ctx, opts={**ctx.opts, "sink": 0, "window": 0})
            level = self.level_for_keep(room / M, M, ctx.opts)
            built = self.build(K[:, s0 : s0 + M], V[:, s0 : s0 + M], level, mid_ctx)
            (sg,) = built.segments
            stream.seed(sg.keys.dense(), sg.values.dense(), sg.num_logw, sg.positions + s0, M)
            info.update(prefill_rounds=built.info.get("rounds"), prefill_kept=built.info.get("kept"))
        elif M:
            zero = K.new_zeros((H, M)) if tp else np.zeros((H, M))
            mid_pos = pos[s0 : s0 + M]
            mid_pos = mid_pos.expand(H, M) if tp else np.broadcast_to(mid_pos, (H, M))
            stream.seed(K[:, s0 : s0 + M], V[:, s0 : s0 + M], zero, mid_pos, M)
        if over:
            hp = pos[s0 + M : n - w0]
            hp = hp.expand(H, over) if tp else np.broadcast_to(hp, (H, over))
            stream.seed_heavy(K[:, s0 + M : n - w0], V[:, s0 + M : n - w0], hp)
        if w0:
            stream.extend(K[:, n - w0 :], V[:, n - w0 :], pos[n - w0 :])
        return Built(stream.segments(), stream=stream, info=info)

    # ----------------------------------------------------------------- exact tokens of the middle
    @staticmethod
    def resolved_heavy_rounds(opts, queries_given: bool) -> int:
        r = opts["heavy_rounds"]
        if r == "auto":
            return 2 if queries_given else 0
        return int(r)

    def _logits(self, K, ctx, temp):
        """``temp * scale * <k_i, q_l>`` ``(H, n, L)`` of the walk's query-aware kernel."""
        from balancekv.fast.blocked_balance import query_logits  # noqa: PLC0415  (torch path only)

        x = self._probe_columns(K, ctx, 0)
        if x is None:
            return query_logits(K, ctx.probes.to(K.dtype), scale=ctx.scale, temp=temp)
        return x if float(temp) == 1.0 else float(temp) * x

    def extra_exact(self, K, s0: int, w0: int, h: int, ctx):
        """``(H, h)`` middle tokens kept exactly. With observed queries and ``heavy_rounds > 0``: the heavy
        hitters (largest ``sum_l softmax(scale <p_l, k_i>)`` over the probes, softmax over all tokens,
        optionally max-pooled along positions, ``heavy_pool``: SnapKV's trick). Otherwise the ``h``
        tokens just before the window (a longer recent window: the neutral choice of the
        ``uniform-halving`` baseline). Eviction methods keep the heavy hitters and drop the rest's
        mass; here the walk estimates that mass."""
        H, n, _ = K.shape
        M = n - s0 - w0
        if not ctx.queries_given or self.resolved_heavy_rounds(ctx.opts, True) == 0:
            rows = np.broadcast_to(np.arange(n - w0 - h, n - w0), (H, h))
            if is_torch(K):
                import torch  # noqa: PLC0415  (torch path only)

                return torch.arange(n - w0 - h, n - w0, device=K.device).expand(H, h)
            return rows.copy()
        k = int(ctx.opts["heavy_pool"])
        score = self.heavy_scores(K, ctx)[:, s0 : n - w0]
        if is_torch(K):
            import torch  # noqa: PLC0415  (torch path only)
            import torch.nn.functional as F  # noqa: PLC0415

            if k > 1:
                score = F.max_pool1d(score[:, None], k, stride=1, padding=k // 2)[:, 0]
            return top_tokens(score, h) + s0
        if k > 1:
            pad = np.full((H, k // 2), -np.inf)
            sp = np.concatenate([pad, score, pad], axis=1)
            score = np.max(np.stack([sp[:, t : t + M] for t in range(k)], axis=-1), axis=-1)
        return top_tokens(score, h) + s0


class UniformHalving(Balance):
    """SPEC 4c: the 4b procedure with ``gamma = 0`` (fair coin signs), the authors' uniform baseline."""

    name = "uniform-halving"
    # the pure baseline of SPEC 4c: no heavy-hitter protection unless asked for
    defaults = {
        **{k: v for k, v in Balance.defaults.items() if k != "gamma" and not k.startswith("cap_")},
        "heavy_rounds": 0,
    }
    fixed_gamma = 0.0
    supports_cap = False  # its decode policy would be balance's walk, not fair coins
    build_capped = Method.build_capped
