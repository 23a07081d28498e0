"""The weighted-token data model of SPEC section 1 and its estimator.

Properties checked (each follows from the definition
``z(q) = sum exp(a_i + num_logw_i) v_i / sum exp(a_i + den_logw_i)``):
exact tokens reproduce attention, weight log 2 equals a duplicated token,
translation of keys changes nothing, -inf padding changes nothing, large norms
do not overflow, reference and torch agree, to_dense reproduces attend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from balancekv.reference.softmax_attention import attention, weighted_attention
from conftest import naive_attention
from hypothesis import given, settings
from hypothesis import strategies as st

import balancekv
from balancekv._arrays import Kind, held_nbytes
from balancekv.compressed import CompressedKV
from balancekv.storage import dense_segment, exact_segment


def make_ckv(K, V, num_logw, den_logw, scale=None, kind=None):
    lead, (m, d), s = K.shape[:-2], K.shape[-2:], V.shape[-1]
    seg = dense_segment(K, V, num_logw, den_logw, np.broadcast_to(np.arange(m), num_logw.shape).copy())
    kind = kind or Kind("numpy", np.float64)
    scale = 1 / np.sqrt(d) if scale is None else scale
    return CompressedKV([seg], lead=lead, d=d, s=s, n_seen=m, scale=scale, kind=kind, method="manual")


finite = st.floats(-3, 3, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_all_tokens_weight_zero_is_exact_attention(h, n, d, q, seed):
    rng = np.random.default_rng(seed)
    K, V, Q = rng.normal(size=(h, n, d)) * 2, rng.normal(size=(h, n, d + 1)), rng.normal(size=(h, q, d)) * 2
    ckv = balancekv.compress(K, V, keep=1.0, method="exact")
    expected = naive_attention(Q, K, V, 1 / np.sqrt(d))
    np.testing.assert_allclose(ckv.attend(Q), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(balancekv.attention(Q, K, V), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_log2_weight_equals_duplicated_token(n, d, seed):
    rng = np.random.default_rng(seed)
    K, V, Q = rng.normal(size=(1, n, d)), rng.normal(size=(1, n, d)), rng.normal(size=(1, 3, d))
    j = int(rng.integers(n))
    w = np.zeros((1, n))
    w[0, j] = np.log(2.0)
    weighted = make_ckv(K, V, w, w.copy()).attend(Q)
    Kd = np.concatenate([K, K[:, j : j + 1]], axis=1)
    Vd = np.concatenate([V, V[:, j : j + 1]], axis=1)
    np.testing.assert_allclose(weighted, naive_attention(Q, Kd, Vd, 1 / np.sqrt(d)), rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**31 - 1), st.floats(-50, 50))
def test_translating_keys_changes_nothing(n, d, seed, shift_scale):
    """SPEC 0: a common key translation t adds scale*<q,t> to every logit of q; z is invariant."""
    rng = np.random.default_rng(seed)
    K, V, Q = rng.normal(size=(2, n, d)), rng.normal(size=(2, n, d)), rng.normal(size=(2, 3, d))
    nl = np.log(rng.uniform(0.5, 4, size=(2, n)))
    dl = np.log(rng.uniform(0.5, 4, size=(2, n)))
    t = shift_scale * rng.normal(size=(2, 1, d))
    base = make_ckv(K, V, nl, dl).attend(Q)
    shifted = make_ckv(K + t, V, nl, dl).attend(Q)
    np.testing.assert_allclose(shifted, base, rtol=1e-8, atol=1e-10)
    # and through compress: same seed, translated keys -> same uniform sample, same estimate
    a = balancekv.compress(K, V, keep=0.5, method="uniform", seed=3).attend(Q)
    b = balancekv.compress(K + t, V, keep=0.5, method="uniform", seed=3).attend(Q)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 10), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_padding_slots_change_nothing(n, pad, d, seed):
    rng = np.random.default_rng(seed)
    K, V, Q = rng.normal(size=(2, n, d)), rng.normal(size=(2, n, d)), rng.normal(size=(2, 4, d))
    nl, dl = rng.normal(size=(2, n)), rng.normal(size=(2, n))
    Kp = np.concatenate([K, 1e3 * rng.normal(size=(2, pad, d))], axis=1)
    Vp = np.concatenate([V, 1e3 * rng.normal(size=(2, pad, d))], axis=1)
    ninf = np.full((2, pad), -np.inf)
    a = make_ckv(K, V, nl, dl).attend(Q)
    b = make_ckv(Kp, Vp, np.concatenate([nl, ninf], 1), np.concatenate([dl, ninf], 1)).attend(Q)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", [1e2, 1e3, 1e4])
def test_huge_norms_do_not_overflow(norm):
    rng = np.random.default_rng(0)
    K = rng.normal(size=(2, 50, 16))
    K = norm * K / np.linalg.norm(K, axis=-1, keepdims=True)
    V = rng.normal(size=(2, 50, 16))
    Q = norm * rng.normal(size=(2, 5, 16)) / 4
    out = balancekv.compress(K, V, keep=1.0, method="exact").attend(Q)
    assert np.isfinite(out).all()
    # scipy's softmax also shifts by the max: an independent stable computation
    np.testing.assert_allclose(out, naive_attention(Q, K, V, 1 / 4), rtol=1e-9, atol=1e-9)
    tout = balancekv.compress(torch.tensor(K), torch.tensor(V), keep=1.0, method="exact").attend(torch.tensor(Q))
    assert torch.isfinite(tout).all()
    uni = balancekv.compress(K, V, keep=0.5, method="uniform", seed=0)
    assert np.isfinite(uni.attend(Q)).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_reference_and_torch_estimators_agree(h, n, d, seed):
    rng = np.random.default_rng(seed)
    K, V, Q = rng.normal(size=(h, n, d)), rng.normal(size=(h, n, d)), rng.normal(size=(h, 3, d))
    nl = np.where(rng.random((h, n)) < 0.2, -np.inf, rng.normal(size=(h, n)))
    dl = np.where(rng.random((h, n)) < 0.2, -np.inf, rng.normal(size=(h, n)))
    dl[:, 0] = 0.0  # at least one denominator slot
    ref = weighted_attention(Q, K, V, nl, dl, 0.3)
    from balancekv.fast.softmax_attention import weighted_attention as fast_wa

    t = lambda x: torch.tensor(x)
    out64 = fast_wa(t(Q), t(K), t(V), t(nl), t(dl), 0.3)
    torch.testing.assert_close(out64, t(ref), rtol=1e-10, atol=1e-12)
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    out32 = fast_wa(f(Q), f(K), f(V), t(nl), t(dl), 0.3)
    torch.testing.assert_close(out32, f(ref), rtol=2e-5, atol=2e-5)


def test_numpy_in_numpy_out_torch_in_torch_out(small_kv):
    K, V, Q = small_kv
    c = balancekv.compress(K.astype(np.float32), V.astype(np.float32), keep=0.5, method="uniform", seed=1)
    assert isinstance(c.keys, np.ndarray) and c.keys.dtype == np.float32
    out = c.attend(Q.astype(np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    ct = balancekv.compress(
        torch.tensor(K, dtype=torch.float32), torch.tensor(V, dtype=torch.float32), keep=0.5, method="uniform", seed=1
    )
    assert isinstance(ct.keys, torch.Tensor) and ct.keys.dtype == torch.float32
    outt = ct.attend(torch.tensor(Q, dtype=torch.float32))
    assert isinstance(outt, torch.Tensor) and outt.dtype == torch.float32
    np.testing.assert_allclose(outt.numpy(), out, rtol=1e-4, atol=1e-5)  # same seed, same sample


def test_arbitrary_leading_dims():
    rng = np.random.default_rng(0)
    K, V, Q = rng.normal(size=(2, 3, 2, 40, 8)), rng.normal(size=(2, 3, 2, 40, 4)), rng.normal(size=(2, 3, 2, 5, 8))
    c = balancekv.compress(K, V, keep=0.5, method="uniform", seed=0, measure=True)
    assert "error" not in balancekv.compress(K, V, keep=0.5, method="uniform", seed=0).diagnostics  # lazy by default
    assert c.keys.shape == (2, 3, 2, 20, 8) and c.values.shape == (2, 3, 2, 20, 4)
    assert c.attend(Q).shape == (2, 3, 2, 5, 4)
    # each head is an independent problem: compressing one head alone at the same level gives
    # a cache of the same size whose estimate is of the same quality
    assert c.diagnostics["error_per_head"].shape == (2, 3, 2)


def test_same_seed_same_result(small_kv):
    K, V, _ = small_kv
    for method in ("uniform", "streaming"):
        a = balancekv.compress(K, V, 0.3, method=method, seed=5)
        b = balancekv.compress(K, V, 0.3, method=method, seed=5)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.num_logw, b.num_logw)
    a = balancekv.compress(K, V, keep=0.25, method="uniform", seed=5)
    c = balancekv.compress(K, V, keep=0.25, method="uniform", seed=6)
    assert not np.array_equal(a.positions, c.positions)
    unseeded = balancekv.compress(K, V, keep=0.25, method="uniform")
    again = balancekv.compress(K, V, keep=0.25, method="uniform", seed=unseeded.diagnostics["seed"])
    np.testing.assert_array_equal(unseeded.positions, again.positions)


def test_to_dense_bias_reproduces_attend(small_kv):
    K, V, Q = small_kv
    c = balancekv.compress(K, V, keep=0.5, method="uniform", seed=2)
    keys, values, bias = c.to_dense()
    np.testing.assert_allclose(naive_attention(Q, keys, values, c.scale, bias), c.attend(Q), rtol=1e-10)


def test_to_dense_augmented_handles_two_sets(small_kv):
    K, V, Q = small_kv
    rng = np.random.default_rng(0)
    nl = np.where(rng.random(K.shape[:-1]) < 0.5, np.log(2.0), -np.inf)
    dl = np.where(np.isfinite(nl), -np.inf, np.log(2.0))
    dl[:, 0] = 0.0
    c = make_ckv(K, V, nl, dl)
    assert not c.single_set
    with pytest.raises(ValueError, match="augmented"):
        c.to_dense()
    keys, values, bias = c.to_dense(augmented=True)
    o = naive_attention(Q, keys, values, c.scale, bias)
    np.testing.assert_allclose(o[..., :-1] / o[..., -1:], c.attend(Q), rtol=1e-10)


def test_append_exact_equals_attention_over_concatenation(small_kv):
    K, V, Q = small_kv
    c = balancekv.compress(K[:, :60], V[:, :60], keep=1.0, method="exact")
    c.append(K[:, 60:70], V[:, 60:70]).append(K[:, 70:], V[:, 70:])
    assert c.n_seen == K.shape[1]
    np.testing.assert_allclose(c.attend(Q), attention(Q, K, V), rtol=1e-10)
    # appended tokens are written into the slot buffer's spare capacity (at most a quarter extra)
    per_slot = (K.shape[-1] + V.shape[-1]) * 8 + 12  # one float64 log-weight (single set), one int32 position
    assert K.shape[0] * K.shape[1] * per_slot <= c.nbytes <= 1.25 * K.shape[0] * K.shape[1] * per_slot


def test_causal_positions_mask_later_tokens(small_kv):
    K, V, Q = small_kv
    n = K.shape[1]
    c = balancekv.compress(K, V, keep=1.0, method="exact")
    pos = np.arange(n - Q.shape[1], n)
    np.testing.assert_allclose(c.attend(Q, positions=pos), attention(Q, K, V, causal=True), rtol=1e-10)
    # query at position p sees exactly tokens 0..p
    p = 10
    np.testing.assert_allclose(
        c.attend(Q[:, :1], positions=np.array([p])), attention(Q[:, :1], K[:, : p + 1], V[:, : p + 1]), rtol=1e-10
    )


def test_nbytes_accounting(small_kv):
    """nbytes is the memory held (storage accounting of balancekv.storage): per kept slot and head,
    keys and values in the input's dtype, one float64 log-weight array (a single-set cache holds one for both
    sets) and an int32 position; a two-set cache holds both log-weight arrays."""
    K, V, _ = small_kv
    h, n, d = K.shape
    s = V.shape[-1]
    per_slot = (d + s) * K.itemsize + 8 + 4
    exact = balancekv.compress(K, V, keep=1.0, method="exact")
    assert exact.nbytes == h * n * per_slot
    assert exact.ratio == pytest.approx(per_slot / ((d + s) * K.itemsize))
    uni = balancekv.compress(K, V, keep=0.25, method="uniform", seed=0)
    m = n // 4
    assert uni.nbytes == h * m * per_slot
    stream = balancekv.compress(K, V, keep=0.25, method="streaming")
    # the window ring holds one weight array for both sets too
    assert h * m * per_slot <= stream.nbytes <= 1.05 * h * m * per_slot
    # two sets (balance-stream's theory variant keeps separate numerator and denominator weights): both held
    two = make_ckv(K[:, :8].copy(), V[:, :8].copy(), np.zeros((h, 8)), np.full((h, 8), np.log(2.0)))
    assert not two.single_set and two.nbytes == h * 8 * (per_slot + 8)
    # float32 torch input: kept tokens in float32, weights float32, positions int32
    Kt, Vt = torch.from_numpy(K).float(), torch.from_numpy(V).float()
    t = balancekv.compress(Kt, Vt, keep=0.25, method="uniform", seed=0)
    assert t.nbytes == h * m * ((d + s) * 4 + 4 + 4)
    assert t.ratio == pytest.approx(t.nbytes / (h * n * (d + s) * 4))


def test_an_exact_segment_holds_one_log_weight_array(small_kv):
    """Exact tokens carry log-weight 0 in both sets: one zero array serves both, so the segment bills keys,
    values, one weight and one position per slot. The methods' never-larger-than-exact rules compare
    against this segment; a second zero array would let a build 4-8 bytes per slot dearer pass them."""
    K, V, _ = small_kv
    h, n, d = K.shape
    s = V.shape[-1]
    sg = exact_segment(K.copy(), V.copy(), np.arange(n))
    assert held_nbytes(sg) == h * n * ((d + s) * K.itemsize + 8 + 4)
    Kt, Vt = torch.from_numpy(K).float(), torch.from_numpy(V).float()
    sg = exact_segment(Kt, Vt, torch.arange(n))
    assert held_nbytes(sg) == h * n * ((d + s) * 4 + 4 + 4)


def test_positions_are_int32_and_a_stream_past_int32_is_refused(small_kv):
    """Held positions are int32 (4 bytes a slot, ``balancekv.storage.POSITION_NP``); a stream whose positions
    would not fit is refused with a ValueError, not wrapped around to negative positions (which would read as
    padding). Control: without the check, the append below stores position -2**31 silently."""
    from balancekv.storage import MAX_POSITION

    K, V, _ = small_kv
    c = balancekv.compress(K, V, keep=1.0, method="exact")
    assert c.positions.dtype == np.int32
    ct = balancekv.compress(torch.from_numpy(K), torch.from_numpy(V), keep=0.5, method="uniform", seed=0)
    assert ct.positions.dtype == torch.int32
    c.n_seen = MAX_POSITION - 1
    c.append(K[:, :1], V[:, :1])  # the last position that fits: 2**31 - 2 ... MAX_POSITION - 1
    with pytest.raises(ValueError, match="int32"):
        c.append(K[:, :1], V[:, :1])


@pytest.mark.parametrize(
    "qs, nls, dls",
    [((3, 2, 5), (4,), (4,)), ((3, 2, 5), (1, 4), (1, 4)), ((3, 2, 5), (3, 4), (1, 4)), ((1, 2, 5), (3, 4), (3, 4)),
     ((2, 3, 2, 5), (3, 4), (3, 4))],
)  # fmt: skip
def test_torch_estimator_broadcasts_leading_dims_like_the_reference(qs, nls, dls):
    """``fast.weighted_attention`` (through ``attend_parts``) broadcasts the leading dims of queries, keys, values and
    either log-weight set as the reference does (one head's log-weights ``(n,)``, a batch of query sets against one
    cache). It failed on these shapes when it first delegated to ``attend_parts`` without broadcasting."""
    from balancekv.fast.softmax_attention import weighted_attention as fast_wa

    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    Q, nl, dl = rng.normal(size=qs), rng.normal(size=nls), rng.normal(size=dls)
    ref = weighted_attention(Q, K, V, nl, dl, 0.3)
    out = fast_wa(*(torch.tensor(x) for x in (Q, K, V, nl, dl)), 0.3)
    torch.testing.assert_close(out, torch.tensor(ref), rtol=1e-10, atol=1e-12)


def test_torch_estimator_refuses_a_query_without_slots():
    """A query whose every slot is masked has the undefined estimate 0/0: the reference raises, and so must the torch
    estimator's SDPA path (SDPA itself returns 0 for such a row), for log-weights that are all -inf and for causal
    attention with more queries than keys. Control: without the check these return rows of zeros."""
    from balancekv.fast.softmax_attention import attention as fast_att
    from balancekv.fast.softmax_attention import weighted_attention as fast_wa

    K, V, Q = torch.randn(1, 4, 4, dtype=torch.float64), torch.randn(1, 4, 2), torch.randn(1, 2, 4)
    ninf = torch.full((1, 4), -float("inf"))
    with pytest.raises(FloatingPointError, match="no slot"):
        fast_wa(Q, K, V, ninf, ninf, 0.3)
    with pytest.raises(FloatingPointError, match="no slot"):
        fast_att(torch.randn(1, 5, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4), causal=True)
