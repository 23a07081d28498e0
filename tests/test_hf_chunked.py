"""A forward of several tokens (chunked prefill, teacher forcing) through a compressed cache with a decode policy.

Its queries attend to the cache as it stood before the forward plus the forward's own tokens exactly (causally), and
the policy takes the tokens after. Appending first would let the tokens push each other, and the prompt's recent
window, into the sketch, the sets or out of a sliding window before the early ones attend: on SmolLM2, teacher-forcing
128 tokens through `subgen` at keep 0.25 cost +1.0 nats per token that way, against +0.04 now
(``benchmarks/README.md``, end-to-end section, session 9). Tiny local GQA Llama (no hub), as in ``test_hf.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny_llama import tiny_llama  # noqa: E402

from balancekv import hf  # noqa: E402
from balancekv.compressed import CompressedKV  # noqa: E402

N, T = 256, 96


def _reference_logits(model, cache, chunk):
    """transformers' own attention over a DynamicCache holding exactly each layer's slots (``streaming`` keeps
    tokens at weight 1, so its dense export is the cache), the chunk at its true RoPE positions."""
    from transformers import DynamicCache

    dc = DynamicCache()
    for i, layer in enumerate(cache.layers):
        K, V, bias = layer.ckv.to_dense()
        assert float(bias.abs().max()) == 0.0
        dc.update(K, V, i)
    pos = torch.arange(cache.get_seq_length(), cache.get_seq_length() + chunk.shape[1])[None]
    return model(chunk, cache=dc, position_ids=pos, use_cache=True).logits


@pytest.mark.parametrize("order", ["deferred", "append-first"])
def test_a_chunk_attends_to_the_cache_before_it_plus_itself(order, monkeypatch):
    """Reference: the chunk through a DynamicCache of the compressed cache's slots (exact tokens only); the logits
    agree to 1e-4. Control (``append-first``, the old order, forced by hiding the cache's decode policy from ``hf``):
    the window of 64 slides past the chunk's early tokens, and the logits differ by more than 0.1."""
    model = hf.enable(tiny_llama("sdpa"))
    g = torch.Generator().manual_seed(1)
    prompt, chunk = torch.randint(0, 128, (1, N), generator=g), torch.randint(0, 128, (1, T), generator=g)
    cache = hf.CompressedCache(model, "streaming", keep=0.25)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        assert all(layer.ckv.has_stream for layer in cache.layers)
        ref = _reference_logits(model, cache, chunk)
        if order == "append-first":
            monkeypatch.setattr(CompressedKV, "has_stream", property(lambda self: False))
        got = model(chunk, cache=cache, use_cache=True).logits
    gap = float((got - ref).abs().max())
    if order == "deferred":
        assert gap < 1e-4
        # the policy took the chunk after its attention: the cache holds its budget, and the last token sees it
        assert cache.get_seq_length() == N + T and all(int(layer.ckv.kept().max()) <= 64 for layer in cache.layers)
    else:
        assert gap > 0.1


def test_single_tokens_and_exact_caches_append_first():
    """A one-token step appends before attending (the decode fast path), and a cache without a decode policy
    (balance's exact arena) never defers: both give the same logits as before for one token."""
    model = hf.enable(tiny_llama("sdpa"))
    g = torch.Generator().manual_seed(2)
    prompt, tok = torch.randint(0, 128, (1, N), generator=g), torch.randint(0, 128, (1, 1), generator=g)
    for method in ("streaming", "balance"):
        cache = hf.CompressedCache(model, method, keep=0.25)
        with torch.no_grad():
            model(prompt, cache=cache, use_cache=True)
            model(tok, cache=cache, use_cache=True)
        assert all(layer._pending is None for layer in cache.layers) and cache.get_seq_length() == N + 1
    assert not CompressedKV.has_stream.fget(cache.layers[0].ckv)
