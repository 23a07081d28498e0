"""What a compression method provides to :func:`balancekv.compress`.

A method is a small class with a name, its options and their defaults, and
these hooks. It works on keys ``(H, n, d)`` and values ``(H, n, s)`` with the
leading (batch, head) dims flattened into one head axis, on one of two paths:

- ``build_reference(K, V, level, ctx)``: NumPy float64, the reference pipeline
  (the definition; reads like the paper);
- ``build_torch(K, V, level, ctx)``: torch tensors on the caller's device in the
  compute dtype (float32, or float64 for float64 input), every step in torch.
  Fed the same generator, a float64 build keeps the same tokens with the same
  weights as the reference (SPEC section 11); randomness is drawn on the host
  from ``ctx.rng`` (:func:`balancekv._arrays.host_uniforms`) and moved once.

``build`` dispatches on the array kind. Segments returned by either are of the
path's kind (positions included); :func:`balancekv.compress` casts dense stores
to the caller's dtype at the end.

- ``levels(n, opts)``: the method's compression levels, least to most
  compressed (halving rounds, sample counts, bits, budgets). The empirical
  ``eps`` search picks, per head, the most compressed level that meets
  ``eps``; a head that meets it at no level is stored exactly.
- ``level_for_keep(keep, n, opts)``: the level for a kept fraction of tokens.
- ``theorem_level(K, V, eps, ctx)``: the level a theorem certifies for ``eps``
  (``None``: only the exact cache is certified); methods without a theorem
  leave ``has_theorem = False``. ``K``, ``V`` are of either kind.

Decode streams (``Built.stream``) implement one protocol, declared by
:class:`DecodeStream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from .._arrays import held_nbytes, is_torch
from ..storage import Segment


@dataclass
class Context:
    """Everything a method needs besides the data: scale, randomness, probes, options."""

    scale: float
    rng: np.random.Generator
    probes: Any  # (H, p, d) probe queries, the path's kind (for query-aware methods)
    delta: float
    opts: dict
    queries_given: bool = False
    backend: str = "reference"
    #: a memo shared by the builds of one ``compress`` call (the ``eps`` search builds many levels and
    #: folds on the same keys): a method stores there what does not depend on the level (keys it owns)
    shared: dict | None = None
    #: rows of the call's probes (``shared["probes"]``) that ``probes`` holds (a fold's training queries);
    #: ``None``: ``probes`` are the call's own
    probe_rows: Any = None


@dataclass
class Built:
    """A method's output at one level: segments over ``(H, …)`` and an optional stream."""

    segments: list[Segment]
    stream: Any = None
    info: dict = field(default_factory=dict)

    def held_nbytes(self) -> int:
        """Bytes the cache of this build holds: its segments and its stream's state, each storage once; a stream
        whose segments are copies (:attr:`balancekv.methods.subgen.SubGenStream.segments_are_copies`) holds its
        state only, the cache builds the segments per read."""
        if self.stream is not None and getattr(self.stream, "segments_are_copies", False):
            return held_nbytes(self.stream)
        return held_nbytes(self.segments, self.stream)


class DecodeStream(Protocol):
    """Decode-time state of a method that keeps compressing after the prefill.

    ``append(k, v, pos)`` takes new tokens ``k (H, t, d)``, ``v (H, t, s)`` (the cache's kind and
    compute dtype) and their stream positions ``pos (t,)`` (ints, the cache's kind) and returns the
    segments of the whole cache after the append. Every token appended is accounted for: it is
    stored, merged into a compressed set, or evicted by the method's stated policy.
    """

    def append(self, k, v, pos) -> list[Segment]: ...

    def segments(self) -> list[Segment]: ...

    # optional: ``observe(Q)`` takes the queries ``Q (H, mq, d)`` that attended to the cache in a decode
    # step (a policy that evicts by accumulated attention, online H2O, needs them).
    # optional: ``to_kind(kind)`` converts the stream's state to the cache's kind and storage dtype
    # once, after the build, so that its segments are the cache's storage (no second copy) and
    # appends write into them in place.


def top_tokens(score, h: int):
    """``(H, h)`` indices of each row's ``h`` largest ``score`` entries (lowest index on ties), in increasing order."""
    if is_torch(score):
        import torch  # noqa: PLC0415  (torch path only)

        return torch.sort(torch.sort(-score, dim=1, stable=True).indices[:, :h], dim=1).values
    return np.sort(np.argsort(-score, axis=1, kind="stable")[:, :h], axis=1)


class Method:
    name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    has_theorem: ClassVar[bool] = False
    #: False for methods that always keep every token (quantization): ``keep < 1`` is refused.
    selects_tokens: ClassVar[bool] = True

    def resolve_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"method {self.name!r} got unknown option(s) {unknown}; its options are {sorted(self.defaults)}"
            )
        opts = {**self.defaults, **options}
        self.check_options(opts)
        return opts

    def check_options(self, opts: dict) -> None:
        """Raise ``ValueError``/``TypeError`` naming the option for a bad value."""

    def uses_queries(self, opts: dict, queries_given: bool) -> bool:
        """True when the build chooses what to keep with ``ctx.probes`` (the queries, or the fallback
        probes): its probe error is then in-sample, and the ``eps`` search cross-fits."""
        return False

    def levels(self, n: int, opts: dict) -> list[dict]:
        """Default for token-selecting methods: kept fractions 1/2, 1/4, … (at least one token)."""
        return halving_levels(n)

    def level_for_keep(self, keep: float, n: int, opts: dict) -> dict:
        """Default: the kept fraction itself is the level."""
        return {"keep": float(keep)}

    def meets_keep_budget(self, opts: dict) -> bool:
        """Whether ``keep`` is a hard bound for these options (False: a theory variant whose size is only
        predicted; ``compress`` then does not replace an oversized build)."""
        return True

    def token_budget(self, keep: float, n: int, opts: dict) -> int:
        """Most tokens per head ``keep`` allows: ``ceil(keep n)`` (a method whose ``keep`` is a mean over
        layers, like MiniKV's pyramid, says its layer's own)."""
        return min(n, max(1, int(np.ceil(keep * n - 1e-9))))

    def build(self, K, V, level: dict, ctx: Context) -> Built:
        """The compressed segments at one level, on the path of ``K``'s kind."""
        if is_torch(K):
            return self.build_torch(K, V, level, ctx)
        return self.build_reference(K, V, level, ctx)

    def rng_level(self, level: dict) -> dict:
        """The part of ``level`` its random generator is derived from (with the seed and the method's name):
        the whole level by default. Levels with the same ``rng_level`` draw the same numbers, so a method
        whose levels share a randomised build (``balance+quant``: one balance walk for every bits) can build
        it once."""
        return level

    def build_many(self, K, V, requests: list[tuple[dict, Context]]) -> list[Built]:
        """The builds of several ``(level, ctx)`` on the same ``K, V``, each equal to ``build(K, V, level, ctx)``
        alone. The default builds them one after the other; a method that can share work between them (one
        sign loop for several walks) overrides it."""
        return [self.build(K, V, level, ctx) for level, ctx in requests]

    # ----------------------------------------------------------------- shared by the builds of one call
    @staticmethod
    def memo(ctx, tag, K, compute):
        """``compute()``, once per ``(tag, probes, keys, scale)`` for the builds of one call (``ctx.shared``):
        what depends on the probes and keys only (not on the level) is shared by every level and fold."""
        if ctx.shared is None:
            return compute()
        key = (tag, id(ctx.probes), id(K), float(ctx.scale))
        hit = ctx.shared.get(key)
        if hit is not None and hit[0] is ctx.probes and hit[1] is K:
            return hit[2]
        out = compute()
        ctx.shared[key] = (ctx.probes, K, out)  # the objects are kept with it: their ids stay theirs
        return out

    @staticmethod
    def _probe_columns(K, ctx, which: int):
        """Torch: the call's probe logits (``which=0``) or softmax weights (``1``), ``(H, n, p)``
        (:func:`balancekv.fast.softmax_attention.probe_softmax`, shared with the exact attention of the
        probes), the columns of ``ctx.probe_rows`` for a fold; ``None`` when ``ctx.probes`` are not the call's."""
        from balancekv.fast.softmax_attention import probe_softmax  # noqa: PLC0415  (torch path only)

        full = None if ctx.shared is None else ctx.shared.get("probes")
        if full is None or (ctx.probe_rows is None and full is not ctx.probes):
            return None
        x = probe_softmax(K, full, ctx.scale, ctx.shared)[which]
        if ctx.probe_rows is None:
            return x
        import torch  # noqa: PLC0415

        return x.index_select(-1, torch.as_tensor(ctx.probe_rows, dtype=torch.int64, device=x.device))

    def heavy_scores(self, K, ctx):
        """``(H, n)``: ``sum_l softmax(scale <p_l, k_i>)`` over the probes, softmax over all tokens (shared by
        the builds of one call, :meth:`memo`; torch: the call's probe softmax, columns for a fold)."""

        def compute():
            if is_torch(K):
                import torch  # noqa: PLC0415  (torch path only)

                w = self._probe_columns(K, ctx, 1)
                if w is not None:
                    return w.sum(-1)
                return torch.softmax(ctx.scale * (ctx.probes @ K.transpose(-1, -2)), dim=-1).sum(1)
            a = ctx.scale * np.einsum("hld,hnd->hln", ctx.probes, K)
            a -= a.max(axis=-1, keepdims=True)
            p = np.exp(a)
            return (p / p.sum(axis=-1, keepdims=True)).sum(axis=1)

        return self.memo(ctx, "heavy_scores", K, compute)

    def build_reference(self, K: np.ndarray, V: np.ndarray, level: dict, ctx: Context) -> Built:
        raise NotImplementedError

    def build_torch(self, K, V, level: dict, ctx: Context) -> Built:
        raise NotImplementedError(f"method {self.name!r} has no torch build")

    def theorem_level(self, K: np.ndarray, V: np.ndarray, eps: float, ctx: Context) -> dict | None:
        raise ValueError(f"method {self.name!r} has no theorem; use guarantee='empirical'")

    #: True for methods with a decode policy under a memory cap (:meth:`build_capped`)
    supports_cap: ClassVar[bool] = False

    def build_capped(self, K, V, cap: int, ctx: Context) -> Built:
        """The prompt ``K, V`` under a memory cap: a :class:`Built` whose ``stream`` never holds more than
        ``cap`` tokens per head, before or after any number of appends (``compress(..., cap=)``)."""
        raise ValueError(f"method {self.name!r} has no decode policy under a memory cap; use one of {CAPPED}")


#: the methods with a capped decode policy (kept in sync by tests/test_capped.py)
CAPPED = ("streaming", "h2o", "balance", "balance-stream", "subgen")


def halving_levels(n: int, min_kept: int = 1) -> list[dict]:
    """Kept fractions ``1/2, 1/4, …`` while at least ``min_kept`` tokens remain."""
    out, j = [], 1
    while n >= min_kept * 2**j:
        out.append({"keep": 2.0**-j})
        j += 1
    return out


def kept_count(keep: float, n: int) -> int:
    """``round(keep * n)``, at least one token."""
    return max(1, min(n, int(round(keep * n))))


def check_int_option(opts: dict, name: str, minimum: int = 0) -> None:
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"option {name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"option {name} must be >= {minimum}, got {v}")


def check_float_option(opts: dict, name: str, lo: float = -np.inf, hi: float = np.inf, lo_open: bool = False) -> None:
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"option {name} must be a real number, got {type(v).__name__}")
    if not np.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"option {name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}")


class UnreliableEstimateWarning(UserWarning):
    """A compressed estimate's mean relative error on the probe queries exceeds 1 (worse than returning 0)."""


def probe_error(segments, K, V, probes, scale: float):
    """Mean relative error over the probe queries per head (host floats) of ``segments`` on either path."""
    from balancekv.api import exact_attention, host, per_head_error  # noqa: PLC0415  (api imports methods)

    return host(per_head_error(segments, probes, exact_attention(probes, K, V, scale), scale))


def flag_probe_error(info: dict, err, method: str) -> None:
    """Record ``err`` (per head) in ``info`` and warn (:class:`UnreliableEstimateWarning`) if a head exceeds 1."""
    import warnings  # noqa: PLC0415

    err = np.asarray(err, np.float64)
    info["probe_error_per_head"] = err.tolist()
    bad = ~(err <= 1.0)
    info["unreliable_heads"] = np.flatnonzero(bad).tolist()
    if bad.any():
        warnings.warn(
            f"{method}: the estimate's mean relative error on the probe queries exceeds 1 on "
            f"{int(bad.sum())} of {err.size} heads (worst {float(np.nanmax(err)):.3g}); the two-set estimate is "
            "unreliable here (keys of large norm); use the default variant or keep more tokens",
            UnreliableEstimateWarning,
            stacklevel=4,
        )
