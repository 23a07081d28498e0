"""Compressed KV caches inside Hugging Face ``transformers`` generation (optional extra ``hf``).

A :class:`CompressedCache` is a ``transformers`` :class:`~transformers.Cache`
whose layers hold a :class:`balancekv.CompressedKV` instead of the full key and
value tensors. It works with ``model.generate(..., past_key_values=cache)`` and
with a plain forward loop::

    from balancekv import hf
    hf.enable(model)                                   # registers the "balancekv" attention
    cache = hf.CompressedCache(model, method="balance", keep=0.25)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32)
    cache.nbytes, cache.ratio

What happens, per attention layer:

1. **Prefill** (the first forward through an empty layer): the prompt attends to
   itself exactly (transformers' own ``sdpa`` path, so the prompt's hidden
   states are untouched). Right after, the layer compresses the prompt's keys
   and values with :func:`balancekv.compress` (any registered method, at the
   layer's ``keep`` or ``eps``), using the last ``probe_window`` queries of each
   query head as probe queries (SnapKV's observation window, H2O's queries, the
   ``eps`` search).
2. **Decoding** (every later forward, one token or many): the new keys and
   values go through :meth:`CompressedKV.append` (the method's decode policy:
   exact tokens for most methods, continued compression for streaming ones),
   and attention runs over the compressed slots with the estimator of SPEC
   section 1: ``z(q) = sum_i e^{a_i + num_i} v_i / sum_i e^{a_i + den_i}``.
   Single-set caches (``num == den``) are ordinary attention with an additive
   logit bias (``sdpa`` with a float mask); two-set caches (``subgen``,
   ``balance-stream``) compute ``exp(lse(a + num) - lse(a + den)) *
   softmax(a + num) @ V``, each log-sum-exp with its own maximum, so neither
   sum underflows against the other in float32.
   Queries attend causally by the stream position of each slot, so a
   multi-token forward (teacher forcing) is causal inside the new tokens.

Grouped-query attention: a :class:`CompressedKV` is per KV head; the ``g`` query
heads of a group share it (query head ``h`` reads KV head ``h // g``, the order
of transformers' ``repeat_kv``). The probe queries of a KV head are the last
``probe_window`` queries of each of its ``g`` query heads, stacked head by head
(as :meth:`balancekv.models.LayerCapture.queries_by_kv_head` does). Methods that
read probes as "the last prompt queries aligned to the end of the cache" (SnapKV,
H2O with queries) therefore see the group's heads one after another; SnapKV's
observation window (its last ``window`` rows) is the last query head's window.

How it plugs into transformers 5.x: the cache layer tags the key tensor it
returns with itself (a Python attribute on the tensor); the attention function
registered as ``"balancekv"`` in :class:`~transformers.AttentionInterface` finds
the tag, runs the prefill compression or the compressed decode attention, and
falls back to plain ``sdpa`` for untagged tensors (so an enabled model behaves
exactly as before with an ordinary cache).

Limits: batches must be unpadded (every sequence of the batch has the same
length; a padded prefill raises ``NotImplementedError``); beam search and
cropping (assisted decoding) are refused; the model must follow transformers'
functional attention interface (Llama, Mistral, Qwen2, SmolLM2, ...).
"""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import numpy as np

if importlib.util.find_spec("transformers") is None:  # pragma: no cover - depends on the install
    raise ImportError(
        "balancekv.hf needs the optional 'hf' extra (transformers, gguf, accelerate): pip install 'balancekv[hf]'"
    )

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .api import compress
from .methods import get_method

ATTN_NAME = "balancekv"
BUDGETS = ("uniform", "pyramid")
_TAG = "_balancekv_layer"

__all__ = [
    "ATTN_NAME",
    "CompressedCache",
    "CompressedLayer",
    "balancekv_attention",
    "enable",
    "generate",
    "layer_keeps",
]


# ---------------------------------------------------------------------- budgets
def layer_keeps(keep: float, layers: int, budgets="uniform", beta: float = 20.0) -> np.ndarray:
    """Kept fraction of each of ``layers`` layers for a mean kept fraction ``keep``.

    ``budgets="uniform"``: every layer keeps ``keep``. ``"pyramid"``: the PyramidKV /
    MiniKV schedule of SPEC section 7 (:func:`balancekv.reference.selection.pyramid_budgets`):
    linear from ``2*keep - keep/beta`` at layer 0 down to ``keep/beta`` at the last layer,
    clipped to ``[0, 1]`` (MiniKV ``beta = 7``, PyramidKV ``beta = 20``). A sequence of
    floats gives each layer's fraction directly. Fractions are later raised to at least one
    token per head.
    """
    from balancekv.reference.selection import pyramid_budgets  # noqa: PLC0415

    if isinstance(budgets, str):
        if budgets not in BUDGETS:
            raise ValueError(f"budgets must be one of {BUDGETS} or a sequence of per-layer fractions, got {budgets!r}")
        if budgets == "uniform":
            return np.full(layers, float(keep))
        return np.asarray(pyramid_budgets(float(keep), int(layers), float(beta)), np.float64)
    arr = np.asarray(budgets, dtype=np.float64)
    if arr.shape != (layers,) or not np.all((arr > 0) & (arr <= 1)):
        raise ValueError(f"budgets as a sequence must hold {layers} fractions in (0, 1], got {budgets!r}")
    return arr


# ---------------------------------------------------------------------- one layer
class CompressedLayer(CacheLayerMixin):
    """One attention layer's cache: the prompt compressed at prefill, decode tokens by the method's policy."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, parent: "CompressedCache", layer_idx: int):
        super().__init__()
        self.parent, self.layer_idx = parent, int(layer_idx)
        self.ckv = None  # the CompressedKV once the prompt is compressed
        self.n_seen = 0  # tokens of the stream seen (RoPE positions), not slots held
        self._prefill = None  # (K, V) of the prompt until the attention function compresses it
        self.retained = None  # (K, V, probes, scale) when the cache keeps the prompt for re-compression
        self._segs: list = []  # segments of ckv already in the dense tensors below
        self._dense = None  # (keys, values, bias-or-(num, den), positions) as torch tensors

    # -- transformers' layer protocol --------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.ckv is None:
            if self._prefill is not None:
                raise RuntimeError(
                    "the prompt of this CompressedCache layer was never compressed: the model's attention is not "
                    f"balancekv's. Call balancekv.hf.enable(model) (attn_implementation={ATTN_NAME!r}) before using "
                    "a CompressedCache"
                )
            self._prefill = (key_states.detach().clone(), value_states.detach().clone())
            self.n_seen = key_states.shape[-2]
            keys = key_states.view_as(key_states)  # a fresh tensor object to carry the tag
            setattr(keys, _TAG, (self, "prefill"))
            return keys, value_states
        self.ckv.append(key_states.detach(), value_states.detach())
        self.n_seen = self.ckv.n_seen
        self._refresh()
        keys = self._dense[0].view_as(self._dense[0])
        setattr(keys, _TAG, (self, "decode"))
        return keys, self._dense[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.ckv, self.n_seen, self._prefill, self.retained, self._segs, self._dense = None, 0, None, None, [], None
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
        else:
            kw["keep"] = float(min(1.0, max(p.keeps[self.layer_idx], 1.0 / n)))
        self.ckv = compress(K, V, **kw)
        self.n_seen = n
        self._segs, self._dense = [], None
        self._refresh()

    def _refresh(self) -> None:
        """Bring the dense torch view of the slots up to date with ``self.ckv`` (incrementally when possible)."""
        segs = self.ckv.segments
        old = self._segs
        incremental = self._dense is not None and len(segs) >= len(old) and all(a is b for a, b in zip(old, segs))
        new = segs[len(old) :] if incremental else segs
        if incremental and not new:
            return
        dev, dt = self.device, self.dtype
        parts = [
            torch.cat([torch.as_tensor(f(s)) for s in new], dim=-2 if i < 2 else -1)
            for i, f in enumerate(
                (lambda s: s.keys.dense(), lambda s: s.values.dense(), lambda s: s.num_logw, lambda s: s.den_logw)
            )
        ]
        pos = torch.from_numpy(np.concatenate([s.positions for s in new], axis=-1))
        parts = [
            parts[0].to(dev, dt),
            parts[1].to(dev, dt),
            parts[2].to(dev, torch.float32),
            parts[3].to(dev, torch.float32),
            pos.to(dev),
        ]
        if incremental:
            parts = [torch.cat([a, b], dim=-2 if i < 2 else -1) for i, (a, b) in enumerate(zip(self._dense, parts))]
        self._dense = tuple(parts)
        self._segs = segs
        self.keys, self.values = parts[0], parts[1]

    # -- attention -------------------------------------------------------------------------
    def attend(self, query, scaling: float):
        """The estimator ``z(q)`` for ``query (B, Hq, t, d)`` over the slots (after this step's append).

        Returns ``(B, t, Hq, s)`` like transformers' attention functions.
        """
        K, Vv, num, den, pos = self._dense
        B, Hq, t, d = query.shape
        Hkv = K.shape[1]
        g = Hq // Hkv
        q = query.reshape(B, Hkv, g * t, d)  # row j*t + i: query head kv*g + j, new token i
        visible = None
        if t > 1:  # causal inside the new tokens: slot position <= query position
            qpos = torch.arange(self.n_seen - t, self.n_seen, device=pos.device).repeat(g)
            visible = pos[:, :, None, :] <= qpos[None, None, :, None]
        if torch.equal(num, den):  # single set: attention with an additive logit bias
            mask = num[:, :, None, :]
            if visible is not None:
                mask = mask.masked_fill(~visible, -math.inf)
            out = F.scaled_dot_product_attention(q, K, Vv, attn_mask=mask.to(q.dtype), scale=scaling)
        else:
            # two sets: z = exp(lse(a + num) - lse(a + den)) * softmax(a + num) @ V, each sum
            # normalised by its own maximum, so neither part underflows against the other
            a = scaling * (q.float() @ K.float().transpose(-1, -2))
            if visible is not None:
                a = a.masked_fill(~visible, -math.inf)
            an, ad = a + num[:, :, None, :], a + den[:, :, None, :]
            lse_n, lse_d = torch.logsumexp(an, dim=-1, keepdim=True), torch.logsumexp(ad, dim=-1, keepdim=True)
            out = (torch.softmax(an, dim=-1) @ Vv.float()) * torch.exp(lse_n - lse_d)
            out = out.to(q.dtype)
        return out.reshape(B, Hq, t, -1).transpose(1, 2).contiguous()

    @property
    def nbytes(self) -> int:
        return 0 if self.ckv is None else int(self.ckv.nbytes)

    @property
    def input_nbytes(self) -> int:
        return 0 if self.ckv is None else int(self.ckv.input_nbytes)


def group_probes(query, n_kv_heads: int, window: int):
    """Probe queries per KV head: the last ``window`` queries of each of its query heads, head by head.

    ``query (B, Hq, n, d)`` -> ``(B, Hkv, g * w, d)`` with ``w = min(window, n // g)`` (at
    least 1) so that no more probes than keys are handed over (H2O's alignment needs it).
    """
    B, Hq, n, d = query.shape
    g = Hq // n_kv_heads
    w = max(1, min(int(window), n // g))
    return query[:, :, n - w :].reshape(B, n_kv_heads, g * w, d)


# ---------------------------------------------------------------------- the cache
class CompressedCache(Cache):
    """A transformers cache compressing each layer's prompt with a ``balancekv`` method.

    Parameters
    ----------
    model : a ``PreTrainedModel`` or its config (used for the number of layers).
    method : any name of :func:`balancekv.available_methods`.
    keep : mean kept fraction per layer, in (0, 1] (``budgets`` spreads it across layers).
    eps : instead of ``keep``, a target error: each head picks its own level (SPEC 8).
    budgets : ``"uniform"``, ``"pyramid"`` (SPEC 7, with ``beta``) or per-layer fractions.
    probe_window : prompt queries per query head used as probes (default 32, SnapKV's window).
    seed : layer ``l`` compresses with seed ``seed + l``.
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
        meth = get_method(method)  # ValueError for an unknown name
        meth.resolve_options(options)  # TypeError/ValueError for a bad option, before any forward pass
        if keep is not None and eps is not None:
            raise ValueError("give at most one of keep and eps")
        if keep is None and eps is None:
            keep = 1.0
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
                raise ValueError(f"keep must be a number in (0, 1], got {keep!r}")
            if keep < 1 and not meth.selects_tokens:
                raise ValueError(f"method {method!r} keeps every token; use keep=1 (or eps) and its options")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
        if isinstance(probe_window, bool) or not isinstance(probe_window, int) or probe_window < 1:
            raise ValueError(f"probe_window must be a positive int, got {probe_window!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.method, self.keep, self.eps, self.options = method, keep, eps, dict(options)
        self.budgets, self.beta = budgets, float(beta)
        self.keeps = layer_keeps(keep if keep is not None else 1.0, n_layers, budgets, beta)
        self.probe_window, self.seed, self.backend = probe_window, seed, backend
        self.retain_prefill = bool(retain_prefill)
        self.n_layers = n_layers
        super().__init__(layers=[CompressedLayer(self, i) for i in range(n_layers)])

    @classmethod
    def recompress(cls, source: "CompressedCache", method: str, **kwargs) -> "CompressedCache":
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

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's compressed cache (SPEC 1 accounting: fp16 entries, fp32 weights)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def input_nbytes(self) -> int:
        """Bytes the full cache of the same tokens would take in fp16."""
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


def balancekv_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """transformers attention function: compressed-cache attention for tagged keys, ``sdpa`` otherwise."""
    tag = getattr(key, _TAG, None)
    if tag is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer, phase = tag
    scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if phase == "prefill":
        _check_prefill_mask(attention_mask, query.shape[-2], key.shape[-2])
        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        layer.finish_prefill(query, scaling)
        return out
    return layer.attend(query, scaling), None


def enable(model):
    """Register the ``"balancekv"`` attention and switch ``model`` to it; returns ``model``.

    With an ordinary cache (or none) the model computes exactly what ``sdpa`` computes.
    """
    AttentionInterface.register(ATTN_NAME, balancekv_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:  # pragma: no cover - models without the interface
        raise TypeError(f"{type(model).__name__} does not accept a custom attention implementation")
    return model


def generate(
    model,
    input_ids,
    method: str = "balance",
    *,
    keep: float | None = None,
    eps: float | None = None,
    budgets="uniform",
    seed: int = 0,
    probe_window: int = 32,
    cache_options: dict | None = None,
    **generate_kwargs,
):
    """``model.generate`` from a compressed prompt cache; returns ``(token ids, cache)``.

    ``generate_kwargs`` go to ``model.generate`` (e.g. ``max_new_tokens``, ``do_sample``).
    """
    enable(model)
    cache = CompressedCache(
        model,
        method,
        keep=keep,
        eps=eps,
        budgets=budgets,
        seed=seed,
        probe_window=probe_window,
        **(cache_options or {}),
    )
    out = model.generate(input_ids, past_key_values=cache, use_cache=True, **generate_kwargs)
    return out, cache
