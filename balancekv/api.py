"""``balancekv.compress`` and ``balancekv.attention`` (SPEC section 8).

``compress`` validates its input, moves it to NumPy float64 with the leading
dims flattened into one head axis, asks the chosen method for its compressed
segments, measures the result on probe queries, and returns a
:class:`~balancekv.CompressedKV` in the caller's kind (NumPy, or torch on the
caller's device).

Three ways to set the budget (give exactly one):

- ``keep``: the kept fraction of tokens, one level for every head;
- ``ratio``: a byte budget, at most ``ratio * input_nbytes`` held bytes, one level for
  every head (:func:`balancekv.budget.ratio_search`);
- ``eps`` with ``guarantee="empirical"`` (default): per head, the most
  compressed level whose predicted mean relative error on the next queries,
  ``margin x`` the error estimated on queries the method did not select with
  (cross-fitted for query-driven methods, and at least the gap check's: the queries with
  the cache's last tokens hidden; without ``queries``, probes fitted to the
  keys), is at most ``eps`` (:mod:`balancekv.budget`); a head that meets ``eps`` at
  no level is stored exactly;
- ``eps`` with ``guarantee="theorem"``: the level the method's theorem
  certifies (constants in ``proofs/``); exact if the theorem needs every token.

Randomness: one seed (drawn and recorded when not given) determines
everything. Each level gets its own generator derived from the seed and the
level's description, so ``keep`` and ``eps`` modes build identical caches at
the same level.
"""

from __future__ import annotations

import math
import warnings
import zlib
from numbers import Integral, Real
from typing import Any

import numpy as np

from balancekv.reference import softmax_attention as ra

from . import _validate as V_
from ._arrays import Kind, cat, held_nbytes, is_torch, take_rows, to_numpy, torch
from .budget import take_queries
from .compressed import BACKENDS, CompressedKV, RaggedKV
from .methods import get_method
from .methods.base import CAPPED, Built, Context
from .storage import KEY_ROWS, Segment, check_stream_length, exact_segment

GUARANTEES = ("empirical", "theorem")
MAX_PROBES = 64
#: the stream tag of the no-query probes' generator (with the seed: ``default_rng([seed, PROBE_TAG])``)
PROBE_TAG = zlib.crc32(b"balancekv:fitted-probes")


def no_query_probes(Kw, seed: int, num: int = MAX_PROBES, spread: float | None = None):
    """The probes ``compress`` measures errors on when no ``queries`` are given: ``num`` queries per head
    from a Gaussian fitted to the keys and shrunk towards their mean (:func:`balancekv.reference.probes.
    fitted_probes`, ``spread`` 0.25, chosen on the tuning text; see ``benchmarks/README.md``, "Probes
    without queries"), ``mu + spread * G (K - mu) / sqrt(n)``.

    ``Kw (H, n, d)`` on either path; returns ``(H, num, d)`` in its kind. ``G`` is drawn on the host from
    ``default_rng([seed, PROBE_TAG])``, one head at a time (the same numbers on both paths), and on the torch
    path moved once per head to ``Kw``'s device: the keys never leave it.
    """
    from balancekv.reference.probes import SPREAD  # noqa: PLC0415

    spread = SPREAD if spread is None else float(spread)
    H, n = int(Kw.shape[0]), int(Kw.shape[-2])
    rng = np.random.default_rng([int(seed), PROBE_TAG])
    tt = is_torch(Kw)
    mu = Kw.mean(-2, keepdim=True) if tt else Kw.mean(-2, keepdims=True)
    out = []
    for h in range(H):  # one (num, n) draw at a time: host memory O(num n), not O(H num n)
        G = rng.standard_normal((num, n))
        if tt:
            G = torch.from_numpy(G).to(device=Kw.device, dtype=Kw.dtype)
        out.append(mu[h] + (spread / math.sqrt(n)) * (G @ (Kw[h] - mu[h])))
    return torch.stack(out) if tt else np.stack(out)


def level_rng(entropy: int, method: str, level: dict | None) -> np.random.Generator:
    """The generator for one level: a function of the seed, the method and the level only."""
    tag = zlib.crc32(f"{method}:{sorted((level or {}).items())!r}".encode())
    return np.random.default_rng([int(entropy), tag])


def _one(xs: list, axis: int):
    return xs[0] if len(xs) == 1 else cat(xs, axis)  # read only: one segment needs no copy


def _joined(segments: list[Segment]) -> tuple:
    """``(K, V, num_logw, den_logw)`` of ``segments`` side by side."""
    return (
        _one([s.keys.dense() for s in segments], -2),
        _one([s.values.dense() for s in segments], -2),
        _one([s.num_logw for s in segments], -1),
        _one([s.den_logw for s in segments], -1),
    )


def segments_attention(segments: list[Segment], Q, scale: float):
    """The estimator of SPEC section 1 over one path's segments (NumPy reference or torch)."""
    K, Vv, nl, dl = _joined(segments)
    return _weighted_attention(Q, K, Vv, nl, dl, scale)


def _weighted_attention(Q, K, Vv, nl, dl, scale: float):
    if is_torch(Q):
        from balancekv.fast import softmax_attention as fa  # noqa: PLC0415  (torch path only)

        return fa.weighted_attention(Q, K, Vv, nl, dl, scale)
    return ra.weighted_attention(Q, K, Vv, nl, dl, scale)


def relative_error(z, exact):
    """``||z - a|| / ||a||`` per query, on either path (norms scaled, so 1e154 does not overflow;
    ``0/0 = 0``, ``x/0 = inf``)."""
    if is_torch(z):
        m = torch.maximum(z.abs().amax(-1, keepdim=True), exact.abs().amax(-1, keepdim=True))
        u = torch.exp2(torch.ceil(torch.log2(torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m)))))
        num = torch.linalg.vector_norm(z / u - exact / u, dim=-1)
        den = torch.linalg.vector_norm(exact / u, dim=-1)
        # 0/0 is 0 (a zero output reproduced exactly), x/0 is inf, as in the reference
        out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
        return torch.where((den == 0) & (num > 0), torch.full_like(num, float("inf")), out)
    return ra.relative_error(z, exact)


def per_head_error(segments, probes, exact, scale):
    """Mean over probe queries of ``||z(q) - Attn(q)|| / ||Attn(q)||``, per head (the path's kind)."""
    return relative_error(segments_attention(segments, probes, scale), exact).mean(-1)


def exact_attention(probes, K, Vv, scale):
    if is_torch(K):
        from balancekv.fast import softmax_attention as fa  # noqa: PLC0415  (torch path only)

        return fa.attention(probes, K, Vv, scale)
    return ra.attention(probes, K, Vv, scale)


def exact_slot_bytes(K, V) -> int:
    """Bytes one head's exact slot holds when ``K`` and ``V`` are what it stores: key and value at their
    dtypes, one log-weight (the exact cache is a single-set cache: one array serves both sets; the compute
    dtype on torch, float64 on NumPy), one int32 position (:data:`balancekv.storage.POSITION_NP`)."""
    if is_torch(K):
        w = 8 if K.dtype == torch.float64 else 4
        return K.shape[-1] * K.element_size() + V.shape[-1] * V.element_size() + w + 4
    return K.shape[-1] * K.dtype.itemsize + V.shape[-1] * V.dtype.itemsize + 8 + 4


def max_distinct_tokens(segments) -> int:
    """The most distinct tokens (stream positions) any head holds in ``segments`` (valid slots only)."""
    pos = host(cat([sg.positions for sg in segments], -1))
    ok = host(cat([sg.valid() for sg in segments], -1)).astype(bool)
    pos, ok = pos.reshape(-1, pos.shape[-1]), ok.reshape(-1, ok.shape[-1])
    return max((np.unique(p[o]).size for p, o in zip(pos, ok)), default=0)


def host(x) -> np.ndarray:
    """A small per-head result (errors, a choice) on the host: decisions are taken there."""
    return np.asarray(x.detach().cpu().tolist()) if is_torch(x) else np.asarray(x)


class PerHeadStream:
    """Decode-time state when heads chose different levels: each level's stream serves its heads.

    Heads whose level has no stream (exact fallback, or a method that stores decode tokens
    exactly) get every appended token in one exact tail that grows with each append.
    """

    def __init__(self, parts):
        self.parts = parts  # list of (head mask, stream or None, segments)
        streamed = np.zeros_like(parts[0][0])
        for mask, stream, _ in parts:
            if stream is not None:
                streamed |= mask
        self.exact_tail_mask = ~streamed
        self.tail = None  # (k, v, pos) of every appended token, for the heads without a stream

    def append(self, k, v, pos):
        out = []
        for i, (mask, stream, segs) in enumerate(self.parts):
            if stream is not None:
                segs = stream.append(k, v, pos)
                self.parts[i] = (mask, stream, segs)
            out.extend(s.masked(mask) for s in segs)
        new = (k, v, pos)
        self.tail = (
            new
            if self.tail is None
            else tuple(cat([a, b], -2 if j < 2 else -1) for j, (a, b) in enumerate(zip(self.tail, new)))
        )
        tk, tv, tp = self.tail
        out.append(exact_segment(tk, tv, tp, "appended").masked(self.exact_tail_mask))
        return out


def _combine(builts: list[Built], choice: np.ndarray) -> tuple[list[Segment] | None, Any, list | None]:
    """Per head ``h``, the segments of ``builts[choice[h]]``: ``(segments, stream, groups)``.

    One level for every head: that build's ``(segments, stream, None)``. Heads at different levels, the
    ragged layout (:class:`~balancekv.compressed.RaggedKV`): ``(None, None, groups)`` with ``groups`` a list
    of ``(heads, segments, stream)``, per level used, the flattened head indices that chose it and that
    level's segments (or decode stream) restricted to those heads (copies: each group holds only its
    heads' slots, codes and residuals). A level whose stream cannot be split per head (``take_heads``; the
    quantized streams can, the balance-stream, SubGen and StreamingLLM streams cannot) falls back to the
    masked layout: every used level's segments for every head, the unchosen heads' slots made padding, and
    a :class:`PerHeadStream` (``(segments, stream, None)``).
    """
    used = sorted(set(choice.tolist()))
    if len(used) == 1:
        b = builts[used[0]]
        return b.segments, b.stream, None
    if all(builts[u].stream is None or hasattr(builts[u].stream, "take_heads") for u in used):
        groups = []
        for u in used:
            heads, b = np.flatnonzero(choice == u), builts[u]
            if b.stream is not None:
                groups.append((heads, None, b.stream.take_heads(heads)))
            else:
                groups.append((heads, [sg.take_heads(heads) for sg in b.segments], None))
        return None, None, groups
    parts = [(choice == u, builts[u].stream, builts[u].segments) for u in used]
    segs = [s.masked(mask) for mask, _, ss in parts for s in ss]
    streamed = any(st is not None for _, st, _ in parts)
    return segs, PerHeadStream(parts) if streamed else None, None


def working_arrays(K, V, queries, path: str, H: int):
    """``(K, V, queries)`` flattened to ``(H, …)`` on the chosen path, in its compute dtype.

    Reference path: float64 NumPy copies. Torch path: tensors on the caller's device (CPU for
    NumPy input), float32 (float64 for float64 input); the caller's tensors are never written
    (methods gather or clone, they do not modify their input).
    """
    if path == "reference":
        conv = lambda x: to_numpy(x).reshape(H, *x.shape[-2:])
    else:
        dt = torch.float64 if K.dtype in (torch.float64, np.float64) else torch.float32

        def conv(x):
            t = x.detach() if is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))
            # contiguous: a model's keys and values are head-transposed views, and every round's row gathers
            # are several times faster on contiguous rows (a copy for such a view, held for the call; contiguous
            # input of the compute dtype is used as it is: methods never write their input)
            return t.to(device=K.device if is_torch(K) else t.device, dtype=dt).reshape(H, *t.shape[-2:]).contiguous()

    return conv(K), conv(V), None if queries is None else conv(queries)


def choose_path(kind: Kind, backend: str) -> tuple[str, str]:
    """``(path, method backend)``: NumPy input runs the reference unless a fast backend is asked for;
    torch input runs the torch path (Triton kernels on CUDA) unless ``backend="reference"``."""
    if backend == "reference":
        return "reference", "reference"
    if backend == "triton":
        from balancekv.fast._triton import interpreting, triton_importable  # noqa: PLC0415  (triton asked for)

        on_cuda = kind.is_torch and str(kind.device).startswith("cuda")
        if not triton_importable() or not (on_cuda or interpreting()):
            # every method, not only those with a kernel: a silent torch run would not be what was asked for
            raise ValueError(
                "backend='triton' needs CUDA tensors and an installed triton (or TRITON_INTERPRET=1 for CPU "
                f"tensors); got {'NumPy arrays' if not kind.is_torch else f'tensors on {kind.device}'}: use "
                "backend='torch' or 'auto'"
            )
    if backend == "auto":
        if not kind.is_torch:
            return "reference", "reference"
        return "torch", "triton" if str(kind.device).startswith("cuda") else "torch"
    return "torch", backend


class Work:
    """One ``compress`` call's working state: the arrays on the chosen path, the probes and their exact
    attention, the seed. Builds any registered method at any level (``level=None``: the exact cache)
    and measures per-query probe errors; :mod:`balancekv.budget` and :mod:`balancekv.auto` search with it."""

    def __init__(
        self, Kw, Vw, Qw, probes, scale, entropy, delta, path, backend, queries_given, lead, kind, select=None
    ):
        self.Kw, self.Vw, self.Qw, self.probes = Kw, Vw, Qw, probes
        # what query-aware methods select with (``ctx.probes``): the probes themselves when queries are
        # given; without queries the last keys, while the errors are measured on ``probes`` (fitted)
        self.select = probes if select is None else select
        self.scale, self.entropy, self.delta = scale, entropy, delta
        self.path, self.backend, self.queries_given = path, backend, queries_given
        self.lead, self.kind = tuple(lead), kind
        self.H, self.n = int(Kw.shape[0]), int(Kw.shape[1])
        check_stream_length(self.n, "K")
        self._exact = None
        self._exact_hidden = None  # (hidden tokens, exact attention of the probes over the rest): the gap check
        self.shared: dict = {"probes": probes}  # what the builds of this call share (Context.shared)

    @property
    def exact_probe(self):
        """Exact attention of every probe query (computed once, on first use)."""
        if self._exact is None:
            if self.path == "torch":
                from balancekv.fast.softmax_attention import probe_softmax  # noqa: PLC0415  (torch path only)

                # the probes' softmax weights, shared with the builds that read them (heavy hitters, kernels)
                w = probe_softmax(self.Kw, self.probes, self.scale, self.shared)[1]
                self._exact = w.transpose(-1, -2) @ self.Vw
            else:
                self._exact = exact_attention(self.probes, self.Kw, self.Vw, self.scale)
        return self._exact

    def context(self, name: str, opts: dict, level, probes=None, probe_rows=None) -> Context:
        return Context(
            scale=self.scale,
            rng=level_rng(self.entropy, name, get_method(name).rng_level(level) if level is not None else None),
            probes=self.select if probes is None else probes,
            delta=self.delta,
            opts=opts,
            queries_given=self.queries_given,
            backend=self.backend,
            shared=self.shared,
            probe_rows=None if probes is None else probe_rows,
        )

    def build(self, name: str, meth, opts: dict, level, probes=None) -> Built:
        """``meth`` at ``level`` (``None``: every token exactly); ``probes`` replaces the method's queries."""
        if level is None:
            K = self.Kw.clone() if self.path == "torch" else self.Kw.copy()
            Vv = self.Vw.clone() if self.path == "torch" else self.Vw.copy()
            return Built([exact_segment(K, Vv, np.arange(self.n))], info={"exact": True})
        return meth.build(self.Kw, self.Vw, level, self.context(name, opts, level, probes))

    def query_errors(self, built: Built, rows=None) -> np.ndarray:
        """``(H, p')`` relative error of the probe queries ``rows`` (indices into the probes; every probe when
        ``None``), host NumPy, computed on the path."""
        return self.final_errors(built, 0, rows)[0]

    def errors_on(self, built: Built, Q, exact) -> np.ndarray:
        """``(H, q)`` relative error of other queries ``Q`` against their ``exact`` attention (host NumPy)."""
        return host(relative_error(segments_attention(built.segments, Q, self.scale), exact))

    def final_errors(self, built: Built, hide_last: int = 0, rows=None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(errors, gap errors)``: ``(H, p')`` relative errors of the probes ``rows`` (all when ``None``) and, for
        ``hide_last > 0`` (the eps rule's gap check, :data:`balancekv.budget.MARGIN_GAP`), ``(H, p)`` those of every
        probe when the cache's last ``hide_last`` tokens (stream positions ``>= n - hide_last``) are hidden from the
        exact attention and from the compressed one alike (``None`` for 0). A head whose compressed slots are all
        hidden has gap error 1 (it has nothing of the visible past: what returning zero scores).

        Torch path: the probe logits over the build's slots are computed once and serve both errors; for a build
        whose every segment's keys are rows of the working keys (:data:`balancekv.storage.KEY_ROWS`) they are
        gathered from the probes' logits over those keys, which the exact attention of the probes already made
        (no key product per build). The reference path runs the definition once per error."""
        g = int(hide_last)
        if g and rows is not None:
            raise ValueError("the gap check is measured on every probe (rows=None)")
        if self.path == "torch":
            return self._torch_errors(built, g, rows)
        probes = self.probes if rows is None else take_queries(self.probes, rows)
        exact = self.exact_probe if rows is None else take_queries(self.exact_probe, rows)
        e = host(relative_error(segments_attention(built.segments, probes, self.scale), exact))
        return e, (self._hidden_errors(built, g) if g else None)

    def _probe_logits(self):
        """``(H, n, p)`` the probes' scaled logits over the working keys (shared with :attr:`exact_probe`)."""
        from balancekv.fast.softmax_attention import probe_softmax  # noqa: PLC0415  (torch path only)

        return probe_softmax(self.Kw, self.probes, self.scale, self.shared)[0]

    def _exact_hidden_torch(self, g: int):
        """Exact attention of every probe over the first ``n - g`` tokens, from the shared probe logits."""
        if self._exact_hidden is None or self._exact_hidden[0] != g:
            cut = self.n - g
            w = torch.softmax(self._probe_logits()[:, :cut], dim=-2)
            self._exact_hidden = (g, w.transpose(-1, -2) @ self.Vw[:, :cut])
        return self._exact_hidden[1]

    def _torch_errors(self, built: Built, g: int, rows):
        from balancekv.fast.softmax_attention import weighted_from_logits  # noqa: PLC0415  (torch path only)

        segs = built.segments
        K, Vv, nl, dl = _joined(segs)
        pos = _one([s.positions for s in segs], -1)
        if all(s.meta.get(KEY_ROWS) for s in segs):
            S = self._probe_logits()  # (H, n, p): the slots' logits are its rows at their positions
            if rows is not None:
                S = S.index_select(-1, torch.as_tensor(rows, dtype=torch.int64, device=S.device))
            a = take_rows(S, pos.clamp_min(0).to(torch.int64))  # (H, m, p')
        else:
            q = self.probes if rows is None else take_queries(self.probes, rows)
            dt = Vv.dtype if Vv.dtype == torch.float64 else torch.float32
            a = self.scale * (K.to(dt) @ q.to(dt).transpose(-1, -2))
        if all(s.num_logw is s.den_logw for s in segs) or torch.equal(nl, dl):
            dl = nl  # one weight set: one softmax
        exact = self.exact_probe if rows is None else take_queries(self.exact_probe, rows)
        e = host(relative_error(weighted_from_logits(a, Vv, nl, dl), exact))
        if not g:
            return e, None
        hide = pos >= self.n - g
        ninf = torch.full((), float("-inf"), dtype=nl.dtype, device=nl.device)
        nl_h = torch.where(hide, ninf, nl)
        dl_h = nl_h if dl is nl else torch.where(hide, ninf, dl)
        empty = ~torch.isfinite(dl_h).any(-1)
        if bool(empty.any()):  # a dummy slot keeps the estimator defined; the head scores 1 below
            nl_h[empty, 0] = 0.0
            if dl_h is not nl_h:
                dl_h[empty, 0] = 0.0
        eg = host(relative_error(weighted_from_logits(a, Vv, nl_h, dl_h), self._exact_hidden_torch(g)))
        eg[host(empty).astype(bool)] = 1.0
        return e, eg

    def _hidden_errors(self, built: Built, g: int) -> np.ndarray:
        """The gap check's ``(H, p)`` errors on the reference path (the definition, run once more)."""
        cut = self.n - g
        if self._exact_hidden is None or self._exact_hidden[0] != g:
            ex = exact_attention(self.probes, self.Kw[..., :cut, :], self.Vw[..., :cut, :], self.scale)
            self._exact_hidden = (g, ex)
        K, Vv, nl, dl = _joined(built.segments)
        hide = _one([s.positions for s in built.segments], -1) >= cut
        nl, dl = np.where(hide, -np.inf, nl), np.where(hide, -np.inf, dl)
        empty = ~np.isfinite(dl).any(-1)
        nl[empty, 0] = dl[empty, 0] = 0.0
        e = host(relative_error(_weighted_attention(self.probes, K, Vv, nl, dl, self.scale), self._exact_hidden[1]))
        e[empty] = 1.0
        return e

    def finalize(self, builts: list[Built], choice, method: str, diag: dict) -> CompressedKV:
        """The cache holding, per head ``h``, ``builts[choice[h]]`` (in the caller's kind)."""
        segs, stream, groups = _combine(builts, np.asarray(choice))
        kind, lead = self.kind, self.lead
        for k, v in diag.items():  # per-head diagnostics in the cache's leading dims
            if k.endswith("_per_head") and isinstance(v, np.ndarray) and v.size == self.H:
                diag[k] = v.reshape(lead)
        work_kind = Kind("torch", self.Kw.dtype, self.Kw.device) if self.path == "torch" else Kind("numpy", np.float64)
        shape = dict(d=int(self.Kw.shape[-1]), s=int(self.Vw.shape[-1]), n_seen=self.n, scale=self.scale, kind=kind)
        if groups is not None:  # heads at different levels: one sub-cache per level (RaggedKV)
            subs = [(h, self._cache(sg, st, (len(h),), method, {}, work_kind, shape)) for h, sg, st in groups]
            return RaggedKV(subs, lead=lead, method=method, diagnostics=diag, work_kind=work_kind, **shape)
        return self._cache(segs, stream, lead, method, diag, work_kind, shape)

    @staticmethod
    def _cache(segs, stream, lead, method, diag, work_kind, shape) -> CompressedKV:
        kind = shape["kind"]
        in_kind = False
        if stream is not None and hasattr(stream, "to_kind") and not isinstance(stream, PerHeadStream):
            stream.to_kind(kind)  # the stream holds its state in the cache's kind: its segments need no copy
            segs = stream.segments()
            in_kind = bool(getattr(stream, "segments_in_kind", False))
        elif segs is None:  # a stream split per head whose segments are converted below
            segs = stream.segments()
        if stream is not None:
            stream = _LeadStream(stream, lead, in_kind)
        out_segments = [sg.reshape_lead(lead).to_kind(kind) for sg in segs]
        return CompressedKV(
            out_segments, lead=lead, method=method, diagnostics=diag, stream=stream, work_kind=work_kind, **shape
        )

    @property
    def input_nbytes(self) -> int:
        """Bytes of the uncompressed cache in the input's dtypes (:attr:`CompressedKV.input_nbytes`)."""
        per = int(self.Kw.shape[-1]) * Kind.itemsize(self.kind.dtype) + int(self.Vw.shape[-1]) * Kind.itemsize(
            self.kind.value_dtype
        )
        return self.H * self.n * per


def compress(
    K,
    V,
    eps: float | None = None,
    *,
    keep: float | None = None,
    ratio: float | None = None,
    cap: int | None = None,
    method: str = "balance",
    queries=None,
    guarantee: str = "empirical",
    folds: int = 2,
    z: float = 1.0,
    margin: float | None = None,
    delta: float = 0.01,
    scale: float | None = None,
    seed: int | None = None,
    backend: str = "auto",
    measure: bool | None = None,
    progress: bool = False,
    **options,
) -> CompressedKV:
    """Compress keys ``K (…, n, d)`` and values ``V (…, n, s)`` into a :class:`CompressedKV`.

    Parameters
    ----------
    eps : target mean relative attention error, in (0, 1) (see "What eps promises" below).
    keep : fraction of tokens kept, in (0, 1]: every token-selecting method keeps at most
        ``ceil(keep * n)`` tokens per head.
    ratio : a byte budget, > 0: the result holds at most ``ratio * input_nbytes`` bytes
        (:attr:`CompressedKV.nbytes`, every array held: slots, weights, positions, codes, scales,
        stream state). Token-selecting methods keep the most tokens that fit (bisection on the kept
        count, every candidate built and billed); ``quant`` the most bits that fit; ``minikv`` and
        ``balance+quant`` the most tokens that fit at each of 8, 4, 2 bits, then the bits with the
        smallest probe error (validated, as for ``eps``). ``ValueError`` naming the smallest
        achievable ratio when nothing fits.
    cap : a memory cap for decoding, an int >= 1: the cache holds at most ``cap`` tokens per head now and
        after any number of :meth:`CompressedKV.append` calls (the prompt, if longer, is compressed to fit;
        shorter, it is held exactly and the cache fills up to the cap before the method's decode policy
        starts compressing; the balance streams within a set or two of slack). Methods with a capped
        policy: ``streaming`` (sink + ring), ``h2o`` (online eviction by accumulated attention: feed the
        decode queries to :meth:`CompressedKV.observe`), ``balance`` (also exact heavy hitters by that
        attention) and ``balance-stream`` (weighted sets merged by the balancing walk), ``subgen``.
        ``streaming`` and ``h2o`` allocate the cap's slots at ``compress`` (a decode append never allocates),
        so after a prompt shorter than the cap ``ratio`` exceeds 1 (``streaming``, 200 tokens, cap 400: 2.06)
        and falls below it once the stream passes the cap. ``balance``, ``balance-stream`` and ``subgen``
        grow with the stream until it reaches the cap (a 30-token prompt under cap 64: 33-55 kB, then
        67-69 kB), and stay flat from there.
        Give exactly one of ``eps``, ``keep``, ``ratio`` and ``cap``.
    method : a name from :func:`balancekv.methods.available_methods`; ``"auto"`` chooses per head
        among several methods and their levels (:mod:`balancekv.auto`).
    queries : observed queries ``(…, p, d)`` (e.g. the prompt's last queries, in position order): the
        probes the error is measured on. Query-aware methods (SnapKV, H2O, heavy hitters and the
        queries kernel of ``balance``) also use them to choose what to keep. Without them the
        error is measured on 64 probes per head fitted to the keys (:func:`no_query_probes`: a
        Gaussian fitted to the keys, shrunk towards their mean, drawn from the seed) and the
        query-aware methods score with the last ``min(64, n)`` keys.
    guarantee : ``"empirical"`` (measure on probes) or ``"theorem"`` (budget from the method's
        theorem, constants in ``proofs/``; ``eps`` only).
    folds, z : cross-fitting of the empirical ``eps`` search for methods that select with the
        queries: ``folds`` contiguous folds of the queries (``folds=1``: no cross-fitting, the
        in-sample error), the estimate is the validated error plus ``z`` standard errors.
    margin : the shift margin of the ``eps`` rule: a level qualifies when ``margin * estimate <= eps``.
        ``None`` (default): calibrated on the tuning text, :data:`balancekv.budget.MARGIN_QUERIES`
        (1) with ``queries`` (the estimate then includes the gap check, below), and
        :data:`balancekv.budget.MARGIN_FITTED` (0.6) with the fitted probes.
    delta : failure probability for theorem budgets and walk thresholds.
    scale : logit scale, default ``1/sqrt(d)``.
    seed : makes the result reproducible; drawn (and recorded in ``diagnostics``) if ``None``.
    backend : ``"auto"`` (torch input: torch path, Triton kernels on CUDA; NumPy input: the NumPy
        reference), ``"reference"`` (NumPy, for any input), ``"torch"`` or ``"triton"``.
    measure : compute the probe error (``diagnostics["error"]``, ``["error_per_head"]``); default
        True in ``eps`` mode (the search needs it) and False otherwise (it costs an exact attention).
    progress : show a progress bar over levels of the ``eps`` search.
    **options : the method's options (see ``get_method(method).defaults``).

    What eps promises (``guarantee="empirical"``)
    ----------------------------------------------
    ``eps`` is a target for the mean relative error ``||z(q) - Attn(q)|| / ||Attn(q)||`` on the queries
    that come *next* (decode), which ``compress`` does not see. Per head it keeps the most compressed
    level whose *predicted* error, ``margin * estimate``, is at most ``eps`` (a head that meets ``eps`` at
    no level is stored exactly, error 0). The estimate:

    - with ``queries``, for a method that selects with them (``get_method(m).uses_queries(opts, True)``:
      SnapKV, H2O, MiniKV; ``balance`` / ``balance+quant`` with heavy hitters or the queries kernel):
      cross-fitted. The queries are split into ``folds`` contiguous folds (blocks of consecutive
      queries); every level is built with the other folds as its queries and measured on the held-out
      fold; the estimate is the mean over all held-out queries plus ``z`` standard errors
      (``std / sqrt(p)``). The final cache is built at the chosen levels with all queries. Other methods
      do not look at the queries when they build: the estimate is their mean error on the queries;
    - without ``queries``: the mean error on the fitted probes (out of selection: query-aware methods
      select with the last keys).

    With ``queries``, the estimate is the larger of that validated error and the *gap check*:
    :data:`balancekv.budget.MARGIN_GAP` (1.2) x the error of the queries when the cache's last
    ``min(128, n // 4)`` tokens are hidden from the exact and the compressed attention alike
    (:data:`balancekv.budget.GAP_TOKENS`). ``queries`` are taken to be the *latest* queries (e.g. the last
    positions of the prefill): they attend most to the tokens just before them, which every method keeps
    exactly, while the next queries read the same cache from further away, where it is compressed. On
    SmolLM2 the validated error alone was about half the error on the next 128 queries and a twentieth on
    recency heads (layer 2: 0.015 against 0.33); the gap check follows it there (0.155). Without queries,
    the margin corrects the fitted probes, which overestimate the next queries' error on layers whose
    queries attend mostly to the first token and underestimate it on others. The defaults were chosen on
    five windows of the tuning text ``numpy-license`` and checked on the report text ``python-docs``
    (``benchmarks/eps_rule_calibration.py``; ``benchmarks/README.md``, "eps on the next queries"): there,
    for ``balance`` and ``balance+quant`` on five layers and eps 0.05, 0.1, 0.2, a layer's mean error on
    the next 128 queries was at most 1.04 eps (``balance``) and 1.19 eps (``balance+quant``) with observed
    queries (0.27 and 0.12 of the fp16 cache's bytes at eps 0.2), and without queries at most 1.17 eps except
    ``balance`` at eps 0.2 (1.64 eps).

    A level whose measured error (validated, in-sample or the gap check's) is 1 or more never meets ``eps``,
    whatever the margin: it estimates no better than returning zero (without queries the margin is 0.6, and at
    eps 0.99 the rule alone chose one-token caches with errors 0.98-1.24).

    The search (:func:`balancekv.budget.eps_search`) judges the levels least compressed first and a head
    stops at the first level it fails (so an estimate that dips at a deeper level is not trusted); the
    search ends once every head has stopped, and levels past that are neither judged nor built
    (``error_levels`` etc. are NaN there, ``level_info`` holds ``{"built": False}``, ``levels_built`` lists
    the built ones). At its level, a head's cache is the one ``keep`` mode builds there for the same seed.
    When the heads' levels differ and one level for every head (the dearest chosen, if it meets ``eps`` on
    every head) bills fewer bytes, that one is taken.

    What it does not promise: a bound (``eps`` is an empirical target from one model and two texts, not a
    theorem; other models, texts, prompt lengths or methods may shift differently — ``uniform``, which
    keeps no sink, is optimistic on fitted probes); the error of a single head, query or position (the
    margins were calibrated on the mean over the 3 KV heads of a layer, and single heads went above
    eps); the error after decode tokens are appended or far beyond the next 128 positions; queries that
    are not the latest (the gap check then measures the wrong distance). Diagnostics:
    ``error_per_head`` (the validated estimate), ``error_gap_per_head`` (the gap check's error, with queries),
    ``error_bound_per_head`` (what was compared with ``eps``: ``margin x`` the larger of the two, SE included),
    ``error_in_sample_per_head`` (the final build on all its queries, optimistic), ``error_se_per_head``,
    ``margin``, ``eps_rule``, ``probe_kind`` (``"queries"`` or ``"fitted"``). For a certified bound
    use ``guarantee="theorem"``.

    Torch input stays torch on its device end to end: validation, probes, the probe error, the
    ``eps`` search, every method's build and the stores run in torch, computing in float32
    (float64 for float64 input); kept tokens are stored in the input's dtype.
    """
    V_.check_kv(K, V)
    if sum(x is not None for x in (eps, keep, ratio, cap)) != 1:
        raise ValueError(
            "give exactly one of eps (target error), keep (kept fraction), ratio (byte budget, a fraction of "
            "the full cache's bytes) and cap (most tokens per head held while decoding)"
        )
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, Integral):
            raise TypeError(f"cap must be an int (tokens per head), got {type(cap).__name__}")
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        cap = int(cap)
    if eps is not None:
        eps = V_.check_open_unit("eps", eps)
    if keep is not None:
        keep = V_.check_open_unit("keep", keep, closed_right=True)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, Real):
            raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio must be finite and positive, got {ratio}")
        ratio = float(ratio)
    if isinstance(folds, bool) or not isinstance(folds, Integral):
        raise TypeError(f"folds must be an int, got {type(folds).__name__}")
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if isinstance(z, bool) or not isinstance(z, Real) or not (math.isfinite(z) and z >= 0):
        raise ValueError(f"z must be a finite real number >= 0, got {z!r}")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, Real)):
        raise TypeError(f"margin must be a real number or None, got {type(margin).__name__}")
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be finite and positive, got {margin!r}")
    if margin is not None and eps is None:
        raise ValueError("margin is the eps rule's: give it with eps (keep, ratio and cap take no margin)")
    V_.check_choice("guarantee", guarantee, GUARANTEES)
    if guarantee == "theorem" and eps is None:
        raise ValueError("guarantee='theorem' certifies an error: give eps (keep and ratio are not error targets)")
    V_.check_choice("backend", backend, BACKENDS)
    delta = V_.check_open_unit("delta", delta)
    V_.check_scale(scale)
    V_.check_seed(seed)
    if measure is not None and not isinstance(measure, bool):
        raise TypeError(f"measure must be a bool or None, got {type(measure).__name__}")
    meth = get_method(method)
    opts = meth.resolve_options(options)
    lead, (n, d) = tuple(K.shape[:-2]), tuple(K.shape[-2:])
    H = int(np.prod(lead, dtype=np.int64))
    if queries is not None:
        V_.check_queries("queries", queries, lead, d, like=K)
    if keep is not None and keep < 1 and not meth.selects_tokens:
        raise ValueError(f"method {method!r} keeps every token; keep must be 1 (use eps or its options)")
    if cap is not None and not meth.supports_cap:
        raise ValueError(f"method {method!r} has no decode policy under a memory cap (cap=); use one of {CAPPED}")
    if guarantee == "theorem" and method == "auto":
        raise ValueError("method 'auto' has no theorem; use guarantee='empirical'")
    kind = Kind.of(K, V)  # keys and values keep their own dtypes (mixed precision is not cast down)
    path, method_backend = choose_path(kind, backend)
    Kw, Vw, Qw = working_arrays(K, V, queries, path, H)
    scale = ra.default_scale(d, scale)
    entropy = int(seed) if seed is not None else int(np.random.SeedSequence().entropy)
    # selection (query-aware methods without queries score with the last keys) and measurement (the error
    # is judged on probes fitted to the keys: a key used as a query mostly attends to itself)
    select = Qw if Qw is not None else Kw[:, -min(MAX_PROBES, n) :]
    probes = Qw if Qw is not None else no_query_probes(Kw, entropy)
    if measure is None:
        measure = eps is not None and guarantee == "empirical"
    work = Work(
        Kw, Vw, Qw, probes, scale, entropy, delta, path, method_backend, queries is not None, lead, kind, select
    )
    from . import budget  # noqa: PLC0415  (the searches import this module)

    margin = budget.default_margin(queries is not None) if margin is None else float(margin)
    cv = budget.CrossFit(folds=int(folds), z=float(z), margin=margin)
    diag: dict[str, Any] = {
        "method": method,
        "options": dict(opts),
        "seed": entropy,
        "eps": eps,
        "keep": keep,
        "ratio": ratio,
        "guarantee": guarantee,
        "probes": int(probes.shape[-2]),
        "probe_kind": "queries" if queries is not None else "fitted",
        "queries_given": queries is not None,
        "path": path,
    }
    if method == "auto":
        from . import auto  # noqa: PLC0415

        return auto.search(work, opts, cv, diag, eps=eps, keep=keep, ratio=ratio, progress=progress)
    if ratio is not None:
        return budget.ratio_search(work, method, meth, opts, cv, diag, ratio, measure=measure)
    errors = None
    if cap is not None:
        level = {"cap": cap}
        built = meth.build_capped(Kw, Vw, cap, work.context(method, opts, level))
        levels, choice, builts = [level], np.zeros(H, dtype=int), [built]
        if measure:
            errors = work.query_errors(built).mean(-1)
    elif keep is not None or guarantee == "theorem":
        if keep is not None:
            # keep=1 keeps every token exactly for every token-selecting method (quantization keeps
            # every token too, at its bits)
            level = None if (keep == 1 and meth.selects_tokens) else meth.level_for_keep(keep, n, opts)
        else:
            ctx = Context(
                scale=scale,
                rng=level_rng(entropy, method, None),
                probes=select,
                delta=delta,
                opts=opts,
                queries_given=queries is not None,
                backend=method_backend,
            )
            level = meth.theorem_level(Kw, Vw, eps, ctx)
            diag["theorem_exact"] = level is None
        built = work.build(method, meth, opts, level)
        if level is not None and keep is not None:
            budget_n = meth.token_budget(keep, n, opts)
            # what the cache will hold: the slots and the decode stream's state (the theory stream's instances
            # are a known extra, see balancekv.methods.balance_stream: there the slots attended over)
            theory = opts.get("variant") == "theory"
            held = held_nbytes(built.segments) if theory else built.held_nbytes()
            exact_b = H * n * exact_slot_bytes(Kw, Vw)
            too_big = held > exact_b
            # (a theory variant only predicts its size, and a walk FAIL stores its set exactly: SPEC 2)
            bounded = meth.meets_keep_budget(opts) and not built.info.get("fallbacks", 0)
            kept_n = max_distinct_tokens(built.segments)
            over = bounded and kept_n > budget_n
            all_held = built.held_nbytes()
            if not (bounded or too_big) and (all_held > exact_b or kept_n > budget_n):
                # returned as it ran (the theorem's algorithm: its size is random), but never silently; a build
                # whose slots alone pass the exact cache is replaced below instead
                diag["over_budget"] = {
                    "kept": int(kept_n),
                    "budget": int(budget_n),
                    "held": int(all_held),
                    "exact": exact_b,
                }
                warnings.warn(
                    f"{method} ({'variant=theory' if theory else 'a walk FAIL stored its set exactly'}): keep={keep} "
                    f"allows {budget_n} tokens per head, the build holds {kept_n} ({all_held} bytes against the "
                    f"exact cache's {exact_b}); its size is predicted, not bounded (diagnostics['over_budget']); use "
                    "the default variant for a hard keep bound",
                    KeepBudgetWarning,
                    stacklevel=2,
                )
            if too_big or over:
                # never larger than the exact cache, never over the keep budget: a build that cannot meet
                # both is replaced by one that always meets both
                tried = built.info
                built, level, diag["fallback"] = _fallback_build(work, method, meth, opts, keep, budget_n)
                built.info.update({k: tried[k] for k in ("retries", "fallbacks") if k in tried})
        levels, choice, builts = [level], np.zeros(H, dtype=int), [built]
        if measure:
            errors = work.query_errors(built).mean(-1)
    else:
        levels = [None] + meth.levels(n, opts)  # index 0: the exact fallback
        bar = None
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415  (only when asked for)

            bar = tqdm(total=len(levels) - 1, desc=f"compress[{method}] levels")
        # judged least compressed first, stopping once every head has failed a level (budget.eps_search)
        sc, builts = budget.eps_search(work, method, meth, opts, levels, cv, eps, progress=bar)
        if bar is not None:
            bar.close()
        # per head, the fewest held bytes among the levels meeting eps (every level builds every head
        # alike, so a level's bytes per head are its bytes / H; a level not built is never chosen); ties go
        # to the more compressed index
        per_head = np.array([np.inf if b is None else b.held_nbytes() / H for b in builts])
        groups, rank = budget.ladder_groups(meth, levels)  # monotone along the search's ladders, as it judged
        choice = budget.cheapest_meeting(
            sc, per_head[:, None] * np.ones((1, H)), eps, exact_index=0, groups=groups, rank=rank
        )
        choice = budget.uniform_if_not_dearer(work, builts, choice, per_head, sc.meets(eps))
        diag.update(sc.diagnostics(choice))
        diag["levels_built"] = [i for i, b in enumerate(builts) if b is not None]
    infos = [{"built": False} if b is None else b.info for b in builts]
    diag.update(
        {
            "levels": levels,
            "level_per_head": choice.reshape(lead),
            "level_info": infos,
            "retries": int(sum(i.get("retries", 0) for i in infos)),
            "fallbacks": int(sum(i.get("fallbacks", 0) for i in infos)),
        }
    )
    if errors is not None:
        diag.update({"error_per_head": errors.reshape(lead), "error": float(errors.mean())})
    if "error_per_head" in diag:
        diag["error_per_head"] = np.asarray(diag["error_per_head"]).reshape(lead)
    c = work.finalize(builts, choice, method, diag)
    # (the theory stream's MergeAndReduce instances are a known extra, as above; so is what a theorem certifies)
    theory = opts.get("variant") == "theory" or guarantee == "theorem"
    exact_bytes = H * n * exact_slot_bytes(K, V)
    if cap is None and not theory and c.nbytes > exact_bytes:
        # never larger than the exact cache, by what the caches hold in the caller's kind (the working-kind checks
        # above cannot see it): a quantized store's scales and zeros do not shrink with the input's dtype, and the
        # NumPy reference SubGen sketch stays float64 beside its segments in a float16 input's dtype
        diag["fallback_reason"] = f"{c.nbytes} bytes held, more than the exact cache's {exact_bytes}"
        budget_n = meth.token_budget(keep, n, opts) if keep is not None and meth.selects_tokens else n
        built, _, diag["fallback"] = _fallback_build(work, method, meth, opts, keep, budget_n)
        if diag["fallback"] == "exact":
            diag["level_per_head"] = np.zeros(lead, dtype=int)
        c = work.finalize([built], np.zeros(H, dtype=int), method, diag)
    return c


class KeepBudgetWarning(UserWarning):
    """A ``keep`` build that holds more tokens than ``keep`` allows, or more bytes than the exact cache: only the
    theorem-backed ``balance-stream`` variant (``variant="theory"``), whose size is predicted, not chosen, or a
    build whose walk failed and stored its set exactly (SPEC 2), is returned so."""


def _fallback_build(work, method: str, meth, opts: dict, keep, budget_n: int):
    """``(built, level, name)`` of the cache that is never larger than the exact cache and never over the keep budget
    of ``budget_n`` tokens per head: the exact cache when that budget is every token, else StreamingLLM (sink and
    recent window, exact tokens) at the budget."""
    if budget_n >= work.n:
        return work.build(method, meth, opts, None), None, "exact"
    sm, level = get_method("streaming"), {"keep": keep}
    return work.build("streaming", sm, sm.resolve_options({}), level), level, "streaming"


class _LeadStream:
    """Adapts a method's ``(H, …)`` stream to the cache's leading dims and the caller's kind."""

    def __init__(self, stream, lead, in_kind: bool = False):
        self.stream, self.lead = stream, tuple(lead)
        #: the stream holds its state in the cache's kind (:meth:`Work.finalize`): its segments need no conversion
        self.in_kind = bool(in_kind)

    def append(self, k, v, pos):
        H = int(np.prod(self.lead, dtype=np.int64))
        segs = self.stream.append(k.reshape(H, *k.shape[-2:]), v.reshape(H, *v.shape[-2:]), pos)
        return [sg.reshape_lead(self.lead) for sg in segs]

    def push(self, k, v, pos) -> None:
        """:meth:`append` without building the segments (an in-kind stream: the cache asks for them when it
        needs them, :meth:`segments`; a decode step reads :meth:`flat_parts` only)."""
        H = math.prod(self.lead)
        add = getattr(self.stream, "push", self.stream.append)  # (a stream's push: its append without segments)
        add(k.reshape(H, *k.shape[-2:]), v.reshape(H, *v.shape[-2:]), pos)

    def segments(self) -> list:
        """The stream's segments in the cache's leading dims."""
        return [sg.reshape_lead(self.lead) for sg in self.stream.segments()]

    def flat_parts(self) -> list:
        """The stream's attention parts with the heads flattened (``(H, …)``): an in-kind stream (the only kind whose
        segments the cache does not hold, :meth:`CompressedKV.parts`) cuts them from its own buffers."""
        return self.stream.flat_parts()

    @property
    def segments_are_copies(self) -> bool:
        """The stream builds new arrays for its segments (the cache reads them when needed, keeps none)."""
        return bool(getattr(self.stream, "segments_are_copies", False))

    @property
    def observes(self) -> bool:
        return hasattr(self.stream, "observe")

    def observe(self, Q) -> None:
        self.stream.observe(Q.reshape(-1, *Q.shape[-2:]))


def attention(Q, K, V, scale: float | None = None, causal: bool = False, backend: str = "auto"):
    """Exact softmax attention ``softmax(scale * Q K^T) V`` with stable exponentials.

    ``Q (…, m, d)``, ``K (…, n, d)``, ``V (…, n, s)`` with equal leading dims; ``causal``
    aligns the last query with the last key. NumPy in, NumPy out; torch in, torch out.
    """
    V_.check_kv(K, V)
    V_.check_queries("Q", Q, tuple(K.shape[:-2]), K.shape[-1], like=K, against="K")
    V_.check_scale(scale)
    V_.check_choice("backend", backend, BACKENDS)
    causal = V_.check_bool("causal", causal)
    if causal and Q.shape[-2] > K.shape[-2]:
        raise ValueError(
            f"causal attention aligns the last query with the last key, so Q may hold at most n={K.shape[-2]} "
            f"queries; got {Q.shape[-2]}"
        )
    kind = Kind.of(Q)
    if backend in ("torch", "triton") or (backend == "auto" and kind.is_torch):
        import torch  # noqa: PLC0415

        from balancekv.fast import softmax_attention as fa  # noqa: PLC0415

        args = [x if kind.is_torch else torch.from_numpy(np.ascontiguousarray(x)) for x in (Q, K, V)]
        out = fa.attention(*args, scale=scale, causal=causal)
        return out.to(Q.dtype) if kind.is_torch else out.numpy()
    out = ra.attention(to_numpy(Q), to_numpy(K), to_numpy(V), scale, causal=causal)
    return kind.wrap(out, dtype=Q.dtype) if kind.is_torch else out.astype(np.result_type(Q.dtype, np.float32))
