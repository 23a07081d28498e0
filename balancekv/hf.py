"""Compressed KV caches inside Hugging Face ``transformers`` generation (optional extra ``hf``).

A :class:`CompressedCache` is a ``transformers`` :class:`~transformers.Cache`
whose layers hold a :class:`balancekv.CompressedKV` instead of the full key and
value tensors. It works with ``model.generate(..., cache=cache)``, with
``pipeline("text-generation")`` (pass ``cache=`` through the call) and with a
plain forward loop::

    from balancekv import hf
    with hf.compressed(model, method="balance", keep=0.25) as cache:
        out = model.generate(ids, cache=cache, max_new_tokens=32)
    cache.nbytes, cache.ratio

    hf.enable(model)                                   # or by hand: wrap the attention ...
    cache = hf.CompressedCache(model, method="snapkv", keep=0.25)
    out = model.generate(ids, cache=cache, max_new_tokens=32)
    hf.disable(model)                                  # ... and restore it

What happens, per attention layer:

1. **Prefill** (the first forward through an empty layer): the prompt attends to
   itself with the model's own attention implementation (``eager``, ``sdpa``,
   ... — :func:`enable` wraps it, it does not replace it, so the prompt's hidden
   states and ``output_attentions`` are untouched). Right after, the layer
   compresses the prompt's keys and values with :func:`balancekv.compress` on the
   model's device and in its dtype (any registered method, at the layer's
   ``keep`` or ``eps``), using the last ``probe_window`` queries of each query
   head as probe queries (SnapKV's observation window, H2O's queries, the
   ``eps`` search).
2. **Decoding** (every later forward, one token or many): the new keys and
   values go through :meth:`CompressedKV.append` — written in place into the
   cache's slot buffer, or handed to the method's decode stream — and attention
   runs over the compressed slots with the one estimator of SPEC section 1
   (:func:`balancekv.fast.attend_parts`): one ``scaled_dot_product_attention``
   with a float bias for a dense single-set cache; per-part partial sums (two
   log-sum-exps for two-set caches, each with its own maximum) otherwise;
   packed low-bit stores read by the Triton split-K kernel on CUDA and
   dequantized on the fly on CPU. Queries attend causally by the stream
   position of each slot, so a multi-token forward (teacher forcing) is causal
   inside the new tokens. Through a cache with a decode policy
   (:attr:`CompressedKV.has_stream`) a multi-token forward attends to the cache as it
   stood before plus its own tokens exactly, and the policy takes them after the
   attention (appended first they would push each other and the prompt's window
   into the sketch or sets before the early ones attend); one token appends first.
3. **Under a memory cap** (``CompressedCache(model, method, cap=C)``): the prompt is
   compressed with ``compress(..., cap=C)`` and every later append goes through the
   method's capped decode policy, so no layer ever holds more than ``C`` tokens per KV
   head; after each step's attention the layer hands the step's queries to
   :meth:`CompressedKV.observe` (online H2O accumulates their attention; the other
   policies ignore them).

Memory: a layer holds its :class:`CompressedKV` (kept tokens in the model's dtype,
packed codes and scales, weights, positions, spare slot capacity) and, with
``retain_prefill=True``, the prompt's keys, values and probes; ``nbytes`` is exactly
what it holds (the retained prompt included: such a cache bills more than the full
cache) and ``ratio`` compares it with the full cache in the model's dtype
(:mod:`balancekv.storage`). Host-side metadata (the ``diagnostics`` dicts, the per-layer
budgets) is not billed.

Grouped-query attention: a :class:`CompressedKV` is per KV head; the ``g`` query
heads of a group share it (query head ``h`` reads KV head ``h // g``, the order
of transformers' ``repeat_kv``). The probe queries of a KV head are the last
``probe_window`` queries of each of its ``g`` query heads, in position order (:func:`group_probes`).

Limits: batches must be unpadded (a padded prefill raises
``NotImplementedError``); beam search and cropping (assisted decoding) are
refused; sliding-window models (Gemma 2/3, Mistral) serve only prompts within
their window (a longer prefill raises ``NotImplementedError`` saying so); the
model must follow transformers' functional attention interface (Llama, Mistral,
Qwen2, SmolLM2, ...). A cache serves one prompt: call
:meth:`CompressedCache.reset` (or make a new cache) for the next.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from numbers import Integral, Real
from types import SimpleNamespace

import numpy as np

if importlib.util.find_spec("transformers") is None:  # pragma: no cover - depends on the install
    raise ImportError(
        "balancekv.hf needs the optional 'hf' extra (transformers, gguf, accelerate): pip install 'balancekv[hf]'"
    )

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from ._validate import check_choice
from .api import compress
from .compressed import BACKENDS
from .methods import get_method
from .methods.base import CAPPED

PREFIX = "balancekv_"
BUDGETS = ("uniform", "pyramid")
_TAG = "_balancekv_layer"

__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "compressed",
    "disable",
    "enable",
    "generate",
    "group_probes",
    "layer_keeps",
]


# ---------------------------------------------------------------------- budgets
def layer_keeps(keep: float, layers: int, budgets="uniform", beta: float = 20.0) -> np.ndarray:
    """Kept fraction of each of ``layers`` layers for a mean kept fraction ``keep``.

    ``budgets="uniform"``: every layer keeps ``keep``. ``"pyramid"``: the PyramidKV /
    MiniKV schedule of SPEC section 7 (:func:`balancekv.reference.selection.pyramid_budgets`):
    linear from ``2*keep - keep/beta`` at layer 0 down to ``keep/beta`` at the last layer,
    clipped to ``[0, 1]`` (MiniKV ``beta = 7``, PyramidKV ``beta = 20``); where clipping at 1 would lower the
    mean below ``keep``, the other layers get the clipped budget (:func:`_keep_mean`). A sequence of
    floats gives each layer's fraction directly. Fractions are later raised to at least one
    token per head.
    """
    from balancekv.reference.selection import pyramid_budgets  # noqa: PLC0415  (only for pyramid budgets)

    if isinstance(budgets, str):
        if budgets not in BUDGETS:
            raise ValueError(f"budgets must be one of {BUDGETS} or a sequence of per-layer fractions, got {budgets!r}")
        if budgets == "uniform":
            return np.full(layers, float(keep))
        return _keep_mean(np.asarray(pyramid_budgets(float(keep), int(layers), float(beta)), np.float64), float(keep))
    arr = np.asarray(budgets, dtype=np.float64)
    if arr.shape != (layers,) or not np.all((arr > 0) & (arr <= 1)):
        raise ValueError(f"budgets as a sequence must hold {layers} fractions in (0, 1], got {budgets!r}")
    return arr


def _keep_mean(ratios: np.ndarray, keep: float) -> np.ndarray:
    """``min(1, ratios + c)`` with the shift ``c >= 0`` that brings the mean back to ``keep`` (bisection): the
    pyramid clipped at 1 in its first layers (``keep > 1 / (2 - 1/beta)``) would keep less than asked on average
    (0.726 for keep 0.9 over 30 layers), so the budget clipped there goes to the other layers, and the schedule
    still decreases with depth."""
    if ratios.mean() >= keep - 1e-12:
        return ratios
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(1.0, ratios + mid).mean() < keep else (lo, mid)
    return np.minimum(1.0, ratios + hi)


# ---------------------------------------------------------------------- one layer
class CompressedLayer(CacheLayerMixin):
    """One attention layer's cache: the prompt compressed at prefill, decode tokens by the method's policy."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, parent: CompressedCache, layer_idx: int):
        super().__init__()
        self.parent, self.layer_idx = parent, int(layer_idx)
        self.ckv = None  # the CompressedKV once the prompt is compressed
        self.n_seen = 0  # tokens of the stream seen (RoPE positions), not slots held
        self._prefill = None  # (K, V) of the prompt until the attention function compresses it
        self.retained = None  # (K, V, probes, scale) when the cache keeps the prompt for re-compression
        self._pending = None  # (K, V) of a multi-token forward, appended after its attention (see attend)

    # -- transformers' layer protocol --------------------------------------------------
    def lazy_initialization(self, key_states, value_states=None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.ckv is None:
            if self._prefill is not None:
                raise RuntimeError(
                    "the prompt of this CompressedCache layer was never compressed: the model's attention is not "
                    "balancekv's. Call balancekv.hf.enable(model) (or use hf.compressed(model, ...)) before using "
                    "a CompressedCache"
                )
            sw = self.parent.sliding_window
            if sw is not None and key_states.shape[-2] > sw:
                raise NotImplementedError(
                    f"this model attends through a sliding window of {sw} tokens (Gemma 2/3, Mistral, ...), and the "
                    f"prompt has {key_states.shape[-2]}: a compressed prompt has no notion of the window, so "
                    "CompressedCache supports such models only for prompts within the window"
                )
            self._prefill = (key_states.detach(), value_states.detach())
            self.n_seen = key_states.shape[-2]
            keys = key_states.view_as(key_states)  # a fresh tensor object to carry the tag
            setattr(keys, _TAG, (self, "prefill"))
            return keys, value_states
        pos = (kwargs.get("kwargs") or {}).get("position_ids") if isinstance(kwargs.get("kwargs"), dict) else None
        if pos is not None and pos.numel() and int(pos.reshape(-1)[0]) != self.n_seen:
            raise ValueError(
                f"this CompressedCache already holds a prompt of {self.n_seen} tokens, and the forward starts at "
                f"position {int(pos.reshape(-1)[0])}: a cache serves one prompt. Call cache.reset() (or make a new "
                "CompressedCache) before the next prompt"
            )
        if key_states.shape[-2] > 1 and self.ckv.has_stream:
            # a forward of several tokens (chunked prefill, teacher forcing) through a decode policy: its queries
            # attend to the cache as it stood before plus its own tokens exactly, and the policy takes them after
            # (appended first, they would push each other and the prompt's recent window into the sketch or sets
            # before the early ones attend)
            self._pending = (key_states.detach(), value_states.detach())
            self.n_seen += key_states.shape[-2]
        else:
            self.ckv.append_rows(key_states.detach(), value_states.detach())
            self.n_seen = self.ckv.n_seen
        keys = key_states.view_as(key_states)
        setattr(keys, _TAG, (self, "decode"))
        return keys, value_states

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.n_seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.ckv, self.n_seen, self._prefill, self.retained, self._pending = None, 0, None, None, None
        self.keys = self.values = None
        self.is_initialized = False

    def _refuse(self, what):
        raise NotImplementedError(f"CompressedCache does not support {what} (beam search, assisted decoding)")

    def reorder_cache(self, beam_idx):
        self._refuse("reordering the batch")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            self._refuse("cropping")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            self._refuse("repeating the batch")

    def batch_select_indices(self, indices) -> None:
        self._refuse("selecting batch rows")

    # -- compression -----------------------------------------------------------------------
    def finish_prefill(self, query, scaling: float) -> None:
        """Compress the stored prompt with probes from ``query (B, Hq, n, d)``; called by the attention function."""
        K, V = self._prefill
        probes = group_probes(query.detach(), K.shape[1], self.parent.probe_window)
        self.compress_from(K, V, probes, float(scaling))
        if self.parent.retain_prefill:
            self.retained = (K, V, probes, float(scaling))
        self._prefill = None

    def compress_from(self, K, V, probes, scaling: float) -> None:
        p = self.parent
        n = K.shape[-2]
        kw = dict(
            method=p.method, queries=probes, scale=scaling, seed=p.seed + self.layer_idx, backend=p.backend, **p.options
        )
        if p.eps is not None:
            kw["eps"] = p.eps
            if p.margin is not None:
                kw["margin"] = p.margin
        elif p.cap is not None:
            kw["cap"] = p.cap
        elif p.byte_ratio is not None:
            kw["ratio"] = p.byte_ratio
        else:
            kw["keep"] = float(min(1.0, max(p.keeps[self.layer_idx], 1.0 / n)))
        self.ckv = compress(K, V, **kw)
        self.n_seen = n

    # -- attention -------------------------------------------------------------------------
    def attend(self, query, scaling: float):
        """The estimator ``z(q)`` for ``query (B, Hq, t, d)`` over the slots (after this step's append).

        Returns ``(B, t, Hq, s)`` like transformers' attention functions, in the query's dtype.
        """
        ckv = self.ckv
        B, Hq, t, d = query.shape
        Hkv = ckv.lead[-1]
        g = Hq // Hkv
        q = query.reshape(B * Hkv, g * t, d)  # row j*t + i: query head kv*g + j, new token i
        qpos = None
        if t > 1:  # causal inside the new tokens: slot position <= query position
            qpos = torch.arange(self.n_seen - t, self.n_seen, device=query.device).repeat(g)
            qpos = qpos.expand(B * Hkv, g * t)
        extra = ()
        if self._pending is not None:  # this forward's own tokens, exact, beside the cache as it stood before
            k, v = self._pending
            L = B * Hkv
            wdt = torch.float64 if query.dtype == torch.float64 else torch.float32
            z = torch.zeros((L, t), dtype=wdt, device=query.device)
            kpos = torch.arange(self.n_seen - t, self.n_seen, device=query.device).expand(L, t)
            extra = ((k.reshape(L, t, -1), v.reshape(L, t, -1), z, z, kpos),)
        out = ckv.attend_rows(  # attend_parts over the cache's parts (one call per group of heads if ragged)
            q,
            scaling,
            query_positions=qpos,
            dtype=query.dtype,
            backend=self.parent.backend if self.parent.backend != "reference" else "torch",
            extra=extra,
        )
        if self._pending is not None:
            ckv.append_rows(*self._pending)
            self._pending = None
        ckv.observe(q.reshape(ckv.lead + (g * t, d)))  # online H2O accumulates attention (others: nothing)
        return out.to(query.dtype).reshape(B, Hq, t, -1).transpose(1, 2).contiguous()

    @property
    def nbytes(self) -> int:
        """The layer's compressed cache and, with ``retain_prefill``, the retained prompt (each storage once)."""
        if self.ckv is None:
            return 0
        return int(self.ckv.nbytes_with(self.retained))

    @property
    def input_nbytes(self) -> int:
        return 0 if self.ckv is None else int(self.ckv.input_nbytes)


def group_probes(query, n_kv_heads: int, window: int):
    """Probe queries per KV head: the last ``window`` queries of each of its query heads, in position order.

    ``query (B, Hq, n, d)`` -> ``(B, Hkv, w * g, d)`` with ``w = min(window, n)`` (a prompt shorter than the
    window gives all of its queries); row ``j * g + i`` is query head ``kv * g + i`` at the ``j``-th of the ``w``
    positions, the layout of the fig1 protocol (:func:`balancekv.experiments.real_data.kv_head_problem`).
    ``compress`` reads its queries as a stream in position order: the cross-fitting folds are then blocks of
    positions, H2O's causal alignment is off by less than a position per row, and SnapKV's window (its last
    ``window`` rows) holds every query head of the group. (Stacked head by head, the window held the last query
    head only, and the folds split the heads instead of the positions.)
    """
    B, Hq, n, d = query.shape
    g = Hq // n_kv_heads
    w = max(1, min(int(window), n))
    return query[:, :, n - w :].reshape(B, n_kv_heads, g, w, d).transpose(2, 3).reshape(B, n_kv_heads, w * g, d)


# ---------------------------------------------------------------------- the cache
def _check_real(name, v, lo, hi, lo_open=True, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        raise ValueError(
            f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"
        )
    return v


class CompressedCache(Cache):
    """A transformers cache compressing each layer's prompt with a ``balancekv`` method.

    Parameters
    ----------
    model : a ``PreTrainedModel`` or its config (used for the number of layers).
    method : any name of :func:`balancekv.available_methods`.
    keep : mean kept fraction per layer, in (0, 1] (``budgets`` spreads it across layers).
    eps : instead of ``keep``, a target error: each head picks its own level (SPEC 8).
    margin : with ``eps`` only, the shift margin of the eps rule (:func:`balancekv.compress`'s ``margin``;
        ``None``: the calibrated default).
    cap : instead of ``keep``, a memory cap: every layer holds at most ``cap`` tokens per KV head through
        prefill and generation (``compress(..., cap=)``: ``streaming``, ``h2o`` (online, fed each decode
        step's queries), ``balance``, ``balance-stream``, ``subgen``).
    ratio : instead of ``keep``, a byte budget: every layer's prompt cache holds at most ``ratio`` of its full
        cache's bytes at prefill (``compress(..., ratio=)``); decode tokens are then appended by the method's policy.
    budgets : ``"uniform"``, ``"pyramid"`` (SPEC 7, with ``beta``; its mean is ``keep``) or per-layer fractions;
        with ``keep`` only.
    probe_window : prompt queries per query head used as probes (default 32, SnapKV's window).
    seed : layer ``l`` compresses with seed ``seed + l``.
    backend : as for :func:`balancekv.compress` (``"auto"``: torch, Triton kernels on CUDA).
    retain_prefill : keep the prompt's keys, values and probes so :meth:`recompress` can
        build other caches from the same prefill (evaluation; costs the full cache's memory).
    **options : the method's options (``balancekv.get_method(method).defaults``).
    """

    def __init__(
        self,
        model,
        method: str = "balance",
        *,
        keep: float | None = None,
        eps: float | None = None,
        margin: float | None = None,
        cap: int | None = None,
        ratio: float | None = None,
        budgets="uniform",
        beta: float = 20.0,
        probe_window: int = 32,
        seed: int = 0,
        backend: str = "auto",
        retain_prefill: bool = False,
        **options,
    ):
        config = getattr(model, "config", model)
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise TypeError("model must be a transformers model or config with num_hidden_layers")
        sw = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        sliding = any("sliding" in str(t) for t in layer_types) or getattr(config, "use_sliding_window", sw is not None)
        #: a prompt longer than this cannot be served (sliding-window layers); None: no limit
        self.sliding_window = int(sw) if (sliding and sw) else None
        meth = get_method(method)  # ValueError for an unknown name
        meth.resolve_options(options)  # TypeError/ValueError for a bad option, before any forward pass
        if sum(x is not None for x in (keep, eps, cap, ratio)) > 1:
            raise ValueError("give at most one of keep, eps, cap and ratio")
        if ratio is not None:
            ratio = _check_real("ratio", ratio, 0.0, float("inf"), hi_open=True)
        if not (isinstance(budgets, str) and budgets == "uniform") and keep is None:
            raise ValueError("budgets spread keep across the layers: give keep (eps, cap and ratio are per layer)")
        check_choice("backend", backend, BACKENDS)
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, Integral) or cap < 1:
                raise ValueError(f"cap must be a positive int (tokens per KV head), got {cap!r}")
            if not meth.supports_cap:
                raise ValueError(f"method {method!r} has no decode policy under a memory cap; use one of {CAPPED}")
            cap = int(cap)
        elif keep is None and eps is None and ratio is None:
            keep = 1.0
        if keep is not None:
            keep = _check_real("keep", keep, 0.0, 1.0)
            if keep < 1 and not meth.selects_tokens:
                raise ValueError(f"method {method!r} keeps every token; use keep=1 (or eps) and its options")
        if eps is not None:
            eps = _check_real("eps", eps, 0.0, 1.0, hi_open=True)
        if margin is not None:
            if eps is None:
                raise ValueError("margin is the eps rule's: give it with eps")
            margin = _check_real("margin", margin, 0.0, float("inf"), hi_open=True)
        self.margin = margin
        if isinstance(probe_window, bool) or not isinstance(probe_window, Integral) or probe_window < 1:
            raise ValueError(f"probe_window must be a positive int, got {probe_window!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.method, self.keep, self.eps, self.cap, self.options = method, keep, eps, cap, dict(options)
        self.byte_ratio = ratio  # (``ratio`` is the held bytes over the full cache)
        self.budgets, self.beta = budgets, float(beta)
        self.keeps = layer_keeps(keep if keep is not None else 1.0, n_layers, budgets, beta)
        self.probe_window, self.seed, self.backend = int(probe_window), int(seed), backend
        self.retain_prefill = bool(retain_prefill)
        self.n_layers = n_layers
        super().__init__(layers=[CompressedLayer(self, i) for i in range(n_layers)])

    @classmethod
    def recompress(cls, source: CompressedCache, method: str, **kwargs) -> CompressedCache:
        """A new cache holding ``source``'s prompt compressed with ``method`` (``source`` needs ``retain_prefill``).

        The prompt's forward pass is not repeated: each layer compresses the keys, values and
        probe queries ``source`` kept. ``kwargs`` as for the constructor.
        """
        if any(layer.retained is None for layer in source.layers):
            raise ValueError("source must be a CompressedCache built with retain_prefill=True after its prefill")
        new = cls(SimpleNamespace(num_hidden_layers=source.n_layers), method, **kwargs)
        for old, layer in zip(source.layers, new.layers):
            K, V, probes, scaling = old.retained
            layer.lazy_initialization(K, V)
            layer.compress_from(K, V, probes, scaling)
        return new

    def reset(self) -> None:
        """Forget the prompt: the cache can serve a new one."""
        for layer in self.layers:
            layer.reset()

    @property
    def nbytes(self) -> int:
        """Bytes every layer's compressed cache holds (:mod:`balancekv.storage`)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def input_nbytes(self) -> int:
        """Bytes the full cache of the same tokens would take in the model's dtype."""
        return sum(layer.input_nbytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.nbytes / max(1, self.input_nbytes)

    def kept_slots(self) -> int:
        """Non-padding slots over all layers, batch rows and heads."""
        return int(sum(int(np.sum(layer.ckv.kept())) for layer in self.layers if layer.ckv is not None))


# ---------------------------------------------------------------------- attention function
def _check_prefill_mask(mask, q_len: int, kv_len: int) -> None:
    """Refuse padded batches: the only mask a prefill may carry is the plain causal one."""
    if mask is None:
        return
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if not torch.equal(allowed.expand(allowed.shape[0], 1, q_len, kv_len), causal.expand(allowed.shape[0], 1, -1, -1)):
        raise NotImplementedError(
            "CompressedCache supports unpadded batches only (all sequences of equal length); "
            "compress each sequence separately"
        )


def _original_attention(name: str, module):
    """The attention function the model used before :func:`enable` (``eager``: the model's own)."""
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:  # pragma: no cover - models without a module-level eager function
            raise TypeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
        return fn
    return AttentionInterface._global_mapping[name]


def _wrapping(original: str):
    """The attention function registered as ``balancekv_<original>``."""

    def balancekv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kw):
        tag = getattr(key, _TAG, None)
        inner = _original_attention(original, module)
        if tag is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        layer, phase = tag
        scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if phase == "prefill":
            _check_prefill_mask(attention_mask, query.shape[-2], key.shape[-2])
            out = inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
            layer.finish_prefill(query, scaling)
            return out
        return layer.attend(query, scaling), None

    balancekv_attention.__name__ = f"balancekv_attention_{original}"
    return balancekv_attention


def enable(model):
    """Wrap ``model``'s attention implementation so that it serves :class:`CompressedCache`; returns ``model``.

    The model's own implementation (``eager``, ``sdpa``, ...) keeps computing everything it
    computed before — with an ordinary cache (or none) an enabled model is unchanged, and the
    prefill of a compressed cache runs through it too. :func:`disable` restores it.
    """
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if current.startswith(PREFIX):
        return model
    name = PREFIX + current
    AttentionInterface.register(name, _wrapping(current))
    mask_fn = AttentionMaskInterface._global_mapping.get(current) or AttentionMaskInterface._global_mapping["sdpa"]
    AttentionMaskInterface.register(name, mask_fn)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # pragma: no cover - models without the interface
        raise TypeError(f"{type(model).__name__} does not accept a custom attention implementation")
    if getattr(model, "_balancekv_hook", None) is None:
        model._balancekv_hook = model.register_forward_pre_hook(_check_new_tokens, with_kwargs=True)
    return model


def _check_new_tokens(module, args, kwargs):
    """A forward through a :class:`CompressedCache` with no new tokens: ``generate`` slices away the prompt's
    first ``cache.get_seq_length()`` tokens as cached, so a cache reused for a prompt no longer than what it
    holds reaches the model with none, and the model fails deep inside its attention. Say why instead."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if not isinstance(cache, CompressedCache):
        return
    x = kwargs.get("input_ids", args[0] if args else None)
    x = kwargs.get("inputs_embeds") if x is None else x
    if x is not None and x.ndim >= 2 and x.shape[1] == 0:
        raise ValueError(
            f"this CompressedCache already holds a stream of {cache.get_seq_length()} tokens, at least as long as "
            "the prompt, so no new token reached the model: a cache serves one stream (a prompt and what follows "
            "it); call cache.reset() or use a new cache to generate from another prompt"
        )


def disable(model):
    """Undo :func:`enable`: the model's original attention implementation again; returns ``model``."""
    current = getattr(model.config, "_attn_implementation", None) or ""
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX) :])
    hook = getattr(model, "_balancekv_hook", None)
    if hook is not None:
        hook.remove()
        model._balancekv_hook = None
    return model


@contextlib.contextmanager
def compressed(model, method: str = "balance", **cache_kwargs):
    """``with hf.compressed(model, method=..., keep=...) as cache:`` — :func:`enable` for the block, a fresh
    :class:`CompressedCache` to pass as ``generate(..., cache=cache)``, and :func:`disable` afterwards
    (unless the model was already enabled)."""
    was = (getattr(model.config, "_attn_implementation", None) or "").startswith(PREFIX)
    enable(model)
    try:
        yield CompressedCache(model, method, **cache_kwargs)
    finally:
        if not was:
            disable(model)


def generate(
    model,
    input_ids,
    method: str = "balance",
    *,
    keep: float | None = None,
    eps: float | None = None,
    margin: float | None = None,
    cap: int | None = None,
    ratio: float | None = None,
    budgets="uniform",
    seed: int = 0,
    probe_window: int = 32,
    cache_options: dict | None = None,
    **generate_kwargs,
):
    """``model.generate`` from a compressed prompt cache; returns ``(token ids, cache)``.

    ``keep``, ``eps`` (with ``margin``), ``cap`` or ``ratio`` as for :class:`CompressedCache`; ``cache_options`` are the
    method's options. ``generate_kwargs`` go to ``model.generate`` (e.g. ``max_new_tokens``, ``do_sample``).
    The model's attention is restored afterwards.
    """
    with compressed(
        model,
        method,
        keep=keep,
        eps=eps,
        margin=margin,
        cap=cap,
        ratio=ratio,
        budgets=budgets,
        seed=seed,
        probe_window=probe_window,
        **(cache_options or {}),
    ) as cache:
        out = model.generate(input_ids, cache=cache, use_cache=True, **generate_kwargs)
    return out, cache
