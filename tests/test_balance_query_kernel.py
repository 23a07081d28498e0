"""The query-aware kernel of practical BalanceKV (``kernel="queries"``, SPEC 4b option).

With observed queries ``q_l``, ``phi_l(k) = exp(scale <q_l, k> - m_l)`` and the walk balances
``sum_i x_i phi_l(k_i) (v'_i, sqrt(a2))`` -- the (shifted) softmax numerator/denominator
discrepancy on each observed query. Tests are deterministic given the fixed seeds.
"""

import numpy as np
import pytest
from balancekv.reference.blocked_balance import blocked_balance, blocked_walk_signs

import balancekv


def scalar_query_walk(K, V, P, r, ok, scale, gamma, a2):
    """Loop-only transcription of the queries kernel walk for one block (no value centring, weights 1)."""
    idx = [i for i in range(len(K)) if ok[i]]
    s = {i: scale * (P @ K[i]) for i in idx}
    m = np.max([s[i] for i in idx], axis=0)
    phi = {i: np.exp(s[i] - m) for i in idx}
    gmax = max(float(phi[i] @ phi[i]) for i in idx)
    x = np.zeros(len(K), np.int8)
    for n, i in enumerate(idx):
        if n == 0:
            x[i] = 1
            continue
        g = sum(float(phi[i] @ phi[j]) / gmax * (float(V[i] @ V[j]) + a2) * x[j] for j in idx if j < i)
        x[i] = 1 if r[i] < min(max(0.5 - gamma * g, 0.0), 1.0) else -1
    return x


@pytest.mark.parametrize("seed", range(4))
def test_query_walk_matches_scalar_transcription(seed):
    rng = np.random.default_rng(seed)
    B, blk = 3, 11
    K, V, P = rng.normal(size=(B, blk, 5)), rng.normal(size=(B, blk, 3)), rng.normal(size=(B, 4, 5))
    r = rng.random((B, blk))
    ok = np.arange(blk)[None, :] < np.array([[blk], [7], [1]])
    x = blocked_walk_signs(
        K, V, r, valid=ok, scale=0.6, gamma=2.0, a2=0.1, value_centering=False, kernel="queries", probes=P
    )
    for b in range(B):
        np.testing.assert_array_equal(x[b], scalar_query_walk(K[b], V[b], P[b], r[b], ok[b], 0.6, 2.0, 0.1))
    assert np.all(x[~ok] == 0) and np.all(np.abs(x[ok]) == 1)


def test_query_walk_reduces_discrepancy_on_observed_queries():
    """Signed sums ``sum_i x_i phi_l(k_i) (v_i, sqrt(a2))`` on the observed queries are smaller with
    the walk (gamma = 4) than with fair coins (gamma = 0), over 300 blocks (fixed seed)."""
    rng = np.random.default_rng(7)
    B, blk, d, L, a2 = 300, 64, 8, 6, 0.5
    K, V, P = rng.normal(size=(B, blk, d)), rng.normal(size=(B, blk, 4)), rng.normal(size=(B, L, d))
    r = rng.random((B, blk))
    s = 0.5 * np.einsum("bld,bid->bli", P, K)
    phi = np.exp(s - s.max(-1, keepdims=True))
    feats = np.concatenate([V, np.full((B, blk, 1), np.sqrt(a2))], -1)
    disc = {}
    for g in (0.0, 4.0):
        x = blocked_walk_signs(K, V, r, scale=0.5, gamma=g, a2=a2, value_centering=False, kernel="queries", probes=P)
        disc[g] = np.linalg.norm(np.einsum("bi,bli,bis->bls", x.astype(float), phi, feats), axis=-1).mean()
    assert disc[4.0] < 0.7 * disc[0.0]


def test_query_kernel_gamma_zero_equals_keys_kernel_gamma_zero():
    rng = np.random.default_rng(1)
    K, V, P = rng.normal(size=(2, 300, 8)), rng.normal(size=(2, 300, 8)), rng.normal(size=(2, 5, 8))
    a = blocked_balance(K, V, itrs=2, block=64, scale=0.3, rng=np.random.default_rng(3), gamma=0.0)
    b = blocked_balance(
        K, V, itrs=2, block=64, scale=0.3, rng=np.random.default_rng(3), gamma=0.0, kernel="queries", probes=P
    )
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_method_option_and_bad_input():
    rng = np.random.default_rng(2)
    K, V, Q = rng.normal(size=(2, 400, 8)), rng.normal(size=(2, 400, 8)), rng.normal(size=(2, 16, 8))
    K0 = K.copy()
    ckv = balancekv.compress(K, V, keep=0.25, method="balance", queries=Q, seed=0, kernel="queries")
    assert np.all(np.isfinite(ckv.attend(Q)))
    np.testing.assert_array_equal(K, K0)
    with pytest.raises(ValueError, match="kernel"):
        balancekv.compress(K, V, keep=0.25, method="balance", seed=0, kernel="bogus")
    with pytest.raises(ValueError, match="probes"):
        blocked_walk_signs(K[:, :10], V[:, :10], rng.random((2, 10)), scale=1.0, kernel="queries")
    with pytest.raises(ValueError, match="probes"):
        blocked_walk_signs(
            K[:, :10], V[:, :10], rng.random((2, 10)), scale=1.0, kernel="queries", probes=np.ones((3, 2, 8))
        )


def test_auto_kernel_resolution():
    """``kernel="auto"``: the queries kernel (value-centred) iff queries were given to compress;
    ``uniform-halving`` (gamma = 0) ignores the kernel: its signs equal the keys kernel's."""
    from balancekv.methods.balance import Balance

    auto = {"kernel": "auto", "value_centering": "auto"}
    assert Balance.resolved_kernel(auto, True) == ("queries", True)
    assert Balance.resolved_kernel(auto, False) == ("keys", False)
    assert Balance.resolved_kernel({"kernel": "queries", "value_centering": False}, False) == ("queries", False)
    rng = np.random.default_rng(4)
    K, V, Q = rng.normal(size=(2, 300, 8)), rng.normal(size=(2, 300, 8)), rng.normal(size=(2, 12, 8))
    a = balancekv.compress(K, V, keep=0.25, method="uniform-halving", queries=Q, seed=1, kernel="queries")
    b = balancekv.compress(K, V, keep=0.25, method="uniform-halving", queries=Q, seed=1, kernel="keys")
    np.testing.assert_array_equal(a.attend(Q), b.attend(Q))
    with pytest.raises(TypeError, match="value_centering"):
        balancekv.compress(K, V, keep=0.25, method="balance", seed=0, value_centering="yes")
