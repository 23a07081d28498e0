"""transformers conventions around ``balancekv.hf``: wrapping (not replacing) the model's attention,
``disable``, the ``compressed`` context manager, ``pipeline``, no deprecation warnings from our code,
and a cache that holds only what it bills.

Tiny local GQA Llama (no hub), as in ``test_hf.py``.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _memory import reachable_array_bytes  # noqa: E402
from _tiny_llama import tiny_llama  # noqa: E402

from balancekv import hf  # noqa: E402
from balancekv.methods import available_methods, get_method  # noqa: E402

N = 256


def tiny(impl: str, dtype=torch.float32):
    return tiny_llama(impl, dtype)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(1))


def test_enable_wraps_eager_and_keeps_attention_weights(prompt):
    """An eager model stays eager: output_attentions still returns the prompt's attention weights
    (a replaced implementation returned none), and disable() restores the original name."""
    model = tiny("eager")
    with torch.no_grad():
        ref = model(prompt, output_attentions=True)
        hf.enable(model)
        assert model.config._attn_implementation == "balancekv_eager"
        got = model(prompt, output_attentions=True, cache=hf.CompressedCache(model, "uniform", keep=0.5))
    assert got.attentions is not None and got.attentions[0] is not None
    torch.testing.assert_close(got.attentions[0], ref.attentions[0])
    torch.testing.assert_close(got.logits, ref.logits)
    hf.disable(model)
    assert model.config._attn_implementation == "eager"


def test_context_manager_enables_for_the_block_only(prompt):
    model = tiny("sdpa")
    with hf.compressed(model, method="snapkv", keep=0.25) as cache:
        assert model.config._attn_implementation == "balancekv_sdpa"
        with torch.no_grad():
            out = model.generate(prompt, cache=cache, max_new_tokens=3, do_sample=False)
    assert model.config._attn_implementation == "sdpa"
    assert out.shape == (1, N + 3) and cache.ratio < 0.5


def word_tokenizer():
    """A local word-level tokenizer over the tiny model's 128 ids ("t0" .. "t127"), no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t1")


def test_pipeline_with_a_compressed_cache(prompt):
    """``pipeline("text-generation")`` passes ``cache=`` to generate (documented in the README): the
    compressed cache serves the whole call and ends holding the prompt plus the new tokens."""
    from transformers import pipeline

    model = tiny("sdpa")
    text = " ".join(f"t{int(i)}" for i in prompt[0])
    tok = word_tokenizer()
    n_prompt = len(tok(text).input_ids)
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    with hf.compressed(model, method="balance", keep=0.25) as cache, torch.no_grad():
        out = gen(text, cache=cache, max_new_tokens=3, do_sample=False, return_full_text=False)
    assert len(out[0]["generated_text"].split()) == 3
    assert cache.get_seq_length() == n_prompt + 2 and cache.ratio < 0.75


def test_no_deprecation_warning_from_our_code(prompt):
    model = tiny("sdpa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            hf.generate(model, prompt, "balance", keep=0.25, max_new_tokens=2, do_sample=False)
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not ours, [str(w.message) for w in ours]


@pytest.mark.parametrize("method", [m for m in available_methods()])
def test_cache_holds_at_most_what_it_bills(prompt, method):
    """Bytes of every tensor reachable from the cache (an independent gc walk, each storage once)
    <= 1.10 x its nbytes, after prefill and 8 decode tokens, in the model's dtype (bf16)."""
    model = tiny("sdpa", torch.bfloat16)
    kw = {"keep": 0.25 if get_method(method).selects_tokens else 1.0}
    if method in ("quant", "minikv", "balance+quant"):
        kw["group"] = 16
    with hf.compressed(model, method=method, **kw) as cache, torch.no_grad():
        model.generate(prompt, cache=cache, max_new_tokens=9, do_sample=False)
    held = reachable_array_bytes(cache, stop=(model,))
    assert cache.nbytes > 0
    assert held <= 1.10 * cache.nbytes, (held, cache.nbytes)
    assert cache.get_seq_length() == N + 8
    if method != "exact":
        assert cache.ratio < 1


@pytest.mark.parametrize("method", ["balance", "exact"])
def test_a_cache_retaining_its_prompt_bills_it(prompt, method):
    """``retain_prefill=True`` keeps the prompt's keys, values and probes (for ``recompress``): ``nbytes`` bills them
    too, so it is within 1.10 of every tensor reachable from the cache (an independent gc walk) and above the full
    cache's bytes. Control: ``nbytes`` billed the compressed caches only (211200 against 448816 held)."""
    model = tiny("sdpa", torch.bfloat16)
    with hf.compressed(model, method=method, keep=0.25 if method != "exact" else 1.0, retain_prefill=True) as cache:
        with torch.no_grad():
            model(prompt, cache=cache)
    held = reachable_array_bytes(cache, stop=(model,))
    assert cache.nbytes <= held <= 1.10 * cache.nbytes, (held, cache.nbytes)
    assert cache.ratio > 1.0


def test_a_second_prompt_needs_a_reset(prompt):
    """A cache serves one prompt (like transformers' own caches, a later forward continues it): a forward
    whose positions restart at 0 is refused with what to do, and after reset() the cache serves it."""
    model = tiny("sdpa")
    with hf.compressed(model, method="uniform", keep=0.5) as cache, torch.no_grad():
        model.generate(prompt, cache=cache, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="reset"):
            model(prompt[:, :16], cache=cache, position_ids=torch.arange(16)[None])
        cache.reset()
        out = model.generate(prompt[:, :16], cache=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 18) and cache.get_seq_length() == 17


@pytest.mark.parametrize("method", ["streaming", "h2o", "balance", "balance-stream", "subgen"])
def test_generation_under_a_memory_cap(prompt, method):
    """``CompressedCache(cap=C)``: every layer holds at most C tokens per KV head through prefill and 40
    decode tokens, holds at most 1.10x what it bills (bf16, gc walk), and bills no more than it did when
    it first filled (flat memory). With a cap the whole stream fits, generation equals plain generation
    token for token (nothing is compressed before it must be; float32)."""
    model = tiny("sdpa")  # float32: bf16 greedy decoding flips on rounding differences between kernels
    short = prompt[:, :24]
    with torch.no_grad():
        plain = model.generate(short, max_new_tokens=16, do_sample=False)
        with hf.compressed(model, method=method, cap=64) as cache:
            roomy = model.generate(short, cache=cache, max_new_tokens=16, do_sample=False)
        assert torch.equal(roomy, plain)
    model = tiny("sdpa", torch.bfloat16)
    with torch.no_grad():
        with hf.compressed(model, method=method, cap=48) as cache:
            model.generate(prompt[:, :40], cache=cache, max_new_tokens=8, do_sample=False)
            filled = cache.nbytes
            for layer in cache.layers:
                assert layer.ckv.kept().max() <= 48
            cache.reset()
            model.generate(prompt, cache=cache, max_new_tokens=40, do_sample=False)
    for layer in cache.layers:
        assert layer.ckv.kept().max() <= 48
        assert layer.ckv.n_seen == N + 39
    assert cache.nbytes <= 1.10 * filled, (cache.nbytes, filled)
    held = reachable_array_bytes(cache, stop=(model,))
    assert held <= 1.10 * cache.nbytes, (held, cache.nbytes)


def test_a_cap_needs_a_capped_policy():
    with pytest.raises(ValueError, match="cap"):
        hf.CompressedCache(tiny("sdpa"), method="snapkv", cap=64)
    with pytest.raises(ValueError, match="at most one"):
        hf.CompressedCache(tiny("sdpa"), method="streaming", cap=64, keep=0.5)


def test_generation_feeds_online_h2o_its_decode_queries(prompt):
    """The layer hands each step's queries to ``CompressedKV.observe``: the held decode tokens of an
    online H2O cache carry accumulated attention (without the call their scores would stay 0)."""
    model = tiny("sdpa")
    with torch.no_grad(), hf.compressed(model, method="h2o", cap=48) as cache:
        model.generate(prompt[:, :40], cache=cache, max_new_tokens=24, do_sample=False)
    for layer in cache.layers:
        st = layer.ckv._stream.stream
        decode = st.pos >= 40
        assert decode.any() and bool((st.score[decode] > 0).all())


def test_generation_through_a_ragged_cache(prompt):
    """eps mode lets heads choose different levels; such a layer's cache is a RaggedKV (one sub-cache per
    level) and generation reads it through ``attend_rows`` each step: the cache holds at most 1.10x what it
    bills, and decode tokens reach every group. (snapkv at eps 0.9 mixes levels on this model's layer 1.)"""
    from balancekv.compressed import RaggedKV

    model = tiny("sdpa")
    with hf.compressed(model, method="snapkv", eps=0.9) as cache, torch.no_grad():
        model.generate(prompt, cache=cache, max_new_tokens=9, do_sample=False)
    ragged = [layer.ckv for layer in cache.layers if isinstance(layer.ckv, RaggedKV)]
    assert ragged, [layer.ckv.diagnostics["level_per_head"] for layer in cache.layers]
    for ckv in ragged:
        assert ckv.n_seen == N + 8 and all(c.n_seen == N + 8 for _, c in ckv.groups)
    held = reachable_array_bytes(cache, stop=(model,))
    assert held <= 1.10 * cache.nbytes, (held, cache.nbytes)
    assert cache.get_seq_length() == N + 8


def test_margin_reaches_the_eps_rule(prompt):
    """``margin`` goes to ``compress``: a smaller margin admits more compressed levels (fewer bytes) on the
    same prompt; without ``eps`` it is refused."""
    model = tiny("sdpa")
    sizes = {}
    for margin in (None, 0.05):
        with hf.compressed(model, method="snapkv", eps=0.5, margin=margin) as cache, torch.no_grad():
            model(prompt, cache=cache, use_cache=True)
        sizes[margin] = cache.nbytes
        if margin is not None:
            assert all(layer.ckv.diagnostics["margin"] == margin for layer in cache.layers)
    assert sizes[0.05] < sizes[None], sizes
    with pytest.raises(ValueError, match="margin"):
        hf.CompressedCache(model, method="snapkv", keep=0.5, margin=1.0)


def test_generate_helper_passes_a_cap(prompt):
    """``hf.generate(..., cap=C)``: every layer holds at most ``C`` tokens per KV head after generation."""
    model = tiny("sdpa")
    out, cache = hf.generate(model, prompt, "streaming", cap=64, max_new_tokens=6, do_sample=False)
    assert out.shape[-1] == N + 6
    assert all(int(layer.ckv.kept().max()) <= 64 for layer in cache.layers)
    assert cache.get_seq_length() == N + 5
