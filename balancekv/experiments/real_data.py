"""Real KV caches for experiments: SmolLM2 / MiniLM captures as per-KV-head problems.

:func:`capture` wraps :func:`balancekv.models.capture_layers` (text by name or
as a string). :func:`kv_head_problem` turns one layer's capture into the arrays
a compressor sees: keys and values per KV head ``(Hkv, n, dh)``, and the queries
that read each KV head stacked along the query axis ``(Hkv, g * q, dh)`` (``g``
query heads per KV head under grouped-query attention) with their positions,
so causal attention can be evaluated with ``CompressedKV.attend(Q, positions=…)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancekv import models
from balancekv.texts import REPORT_TEXT, TEXTS, get_text

#: The SmolLM2 layer the demo uses (a middle layer: neither the sink-dominated first layers nor the last).
DEMO_LAYER = 15


@dataclass
class KVProblem:
    """One layer's keys ``K (Hkv, n, dh)``, values ``V``, queries ``Q (Hkv, mq, dh)`` with positions ``qpos (mq,)``.

    ``probes (Hkv, p, dh)``, optional: earlier queries a query-aware compressor may look
    at (positions ascending), disjoint from the evaluated queries ``Q``.
    """

    K: np.ndarray
    V: np.ndarray
    Q: np.ndarray
    qpos: np.ndarray
    scale: float
    description: str
    probes: np.ndarray | None = None


def resolve_text(text: str) -> tuple[str, str]:
    """``(label, text)``: a name from :data:`balancekv.texts.TEXTS` is looked up, any other string used as is."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string (a name from {TEXTS} or the text itself), got {type(text).__name__}")
    if text in TEXTS:
        return text, get_text(text)
    return f"text#{models.text_hash(text)}", text


def capture(
    model: str = "smollm2", text: str = REPORT_TEXT, n: int = 2048, layers=(1,), use_cache: bool = True
) -> dict[int, models.LayerCapture]:
    """Per-layer queries/keys/values of ``model`` on the first ``n`` tokens of ``text`` (cached on disk)."""
    _, body = resolve_text(text)
    return models.capture_layers(model, body, n, layers, use_cache=use_cache)


def kv_head_problem(
    cap: models.LayerCapture, last: int, description: str = "", probes: int = 0, probes_end: int | None = None
) -> KVProblem:
    """Keys/values per KV head and the last ``last`` query positions of every query head, grouped per KV head.

    ``probes > 0``: also the ``probes`` query positions ending before ``probes_end``
    (default ``n - last``, i.e. just before the evaluated queries), position-ordered.
    """
    Q, qpos = cap.queries_by_kv_head(last)
    P = None
    if probes:
        end = cap.n - last if probes_end is None else int(probes_end)
        if not 1 <= probes <= end:
            raise ValueError(f"probes must be in [1, {end}], got {probes}")
        Pall, _ = cap.queries_by_kv_head(cap.n - end + probes, order="position")
        g = int(np.count_nonzero(cap.kv_group == 0))
        P = Pall[:, : probes * g]
    return KVProblem(
        cap.keys, cap.values, Q, qpos, cap.scale, description or f"{cap.model} layer {cap.layer}, n={cap.n}", P
    )


def demo_capture(n: int = 2048, layer: int = DEMO_LAYER, text: str = REPORT_TEXT, q: int = 64) -> KVProblem:
    """A :class:`KVProblem` from one SmolLM2 layer, for ``balancekv demo``.

    ``K``, ``V``: float64 ``(3, n, 64)`` (the 3 KV heads, keys after RoPE, as cached).
    ``Q``: the last ``q`` query positions of the 3 query heads that read each KV head,
    ``(3, 3 * q, 64)``, scored causally at ``qpos``; ``probes``: the ``q`` query positions
    just before them (what a query-aware compressor observes, as in the fig1 protocol).
    Raises :class:`ImportError` (with the install command) when the ``hf`` extra or
    the model package is missing.
    """
    models.check_available("smollm2")
    label, _ = resolve_text(text)
    cap = capture("smollm2", text, n, [layer])[layer]
    desc = (
        f"SmolLM2-135M-Instruct layer {layer}, text '{label}', n={n}, 3 KV heads x d=64 "
        f"(post-RoPE keys); scored: last {q} positions x 3 query heads per KV head (causal); "
        f"observed queries: the {q} positions before"
    )
    return kv_head_problem(cap, q, desc, probes=q)
