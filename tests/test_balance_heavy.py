"""The heavy-hitter hybrid of ``balance`` (option ``heavy_rounds``).

Shape properties (goodpoints-style): protected tokens are kept with log-weight 0,
the total kept size matches the plain ``T``-round run (never exceeds it), indices
are unique and sorted, and the rest of the middle is halved ``T + r`` rounds
(weights in ``{1, 2, ..., 2^(T+r)}``). Quality: with observed queries, protecting
heavy hitters and balancing the rest beats both plain balancing and SnapKV-style
eviction at equal kept size on the heavy-tailed ``llm`` family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from balancekv.reference.blocked_balance import blocked_balance
from balancekv.reference.softmax_attention import attention, relative_error

import balancekv


@pytest.fixture(scope="module")
def llm():
    K, V, Q = balancekv.synthetic.make_kv("llm", heads=3, n=768, d=32, q=96, seed=4)
    return K, V, Q[:, :32], Q[:, 32:]


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("r", [1, 2])
def test_hybrid_shape_properties(llm, keep, r):
    K, V, P, _ = llm
    plain = balancekv.compress(K, V, keep=keep, method="balance", queries=P, seed=0, heavy_rounds=0)
    hyb = balancekv.compress(K, V, keep=keep, method="balance", queries=P, seed=0, heavy_rounds=r)
    info, info0 = hyb.diagnostics["level_info"][0], plain.diagnostics["level_info"][0]
    assert info["exact_extra"] > 0 and info["rounds"] == info0["rounds"] + r  # r more rounds free the room
    kept_plain, kept = plain.kept(), hyb.kept()
    budget = int(np.ceil(keep * K.shape[1]))
    assert np.all(kept <= budget) and np.all(kept >= kept_plain - 2)  # both within the budget
    pos, lw = hyb.positions, hyb.num_logw
    for h in range(pos.shape[0]):
        assert np.all(np.diff(pos[h]) > 0)
    w = np.exp(lw)
    allowed = 2.0 ** np.arange(info["rounds"] + 1)
    assert np.all(np.isclose(w[..., None], allowed).any(-1))
    exact = info["sink"] + info["window"] + info["exact_extra"]
    assert np.sum(np.isclose(w, 1.0)) >= K.shape[0] * exact  # sink + window + heavy hitters exact


def test_protected_tokens_are_kept_exactly():
    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(2, 300, 8)), rng.normal(size=(2, 300, 8))
    protect = np.array([[40, 41, 200], [100, 150, 250]])
    idx, lw = blocked_balance(K, V, itrs=2, block=32, sink=8, window=8, scale=0.3, rng=rng, protect=protect)
    for h in range(2):
        for j in protect[h]:
            k = np.flatnonzero(idx[h] == j)
            assert k.size == 1 and lw[h, k[0]] == 0.0
    with pytest.raises(ValueError, match="protect"):
        blocked_balance(K, V, itrs=1, block=32, sink=8, window=8, scale=0.3, rng=rng, protect=np.array([[3], [4]]))
    with pytest.raises(ValueError, match="protect"):
        blocked_balance(
            K, V, itrs=1, block=32, sink=8, window=8, scale=0.3, rng=rng, protect=np.array([[40, 40], [50, 51]])
        )


def test_hybrid_beats_plain_balance_and_snapkv_on_heavy_tailed_data(llm):
    """Measured margins on this seeded family are 5x and more; the test asks for 1.5x."""
    K, V, P, Qe = llm
    exact = attention(Qe, K, V)
    err = lambda c: float(relative_error(c.attend(Qe), exact).mean())
    for keep in (0.5, 0.25):
        hyb = balancekv.compress(K, V, keep=keep, method="balance", queries=P, seed=0, heavy_rounds=1)
        plain = balancekv.compress(K, V, keep=keep, method="balance", queries=P, seed=0, heavy_rounds=0)
        snap = balancekv.compress(K, V, keep=float(hyb.kept().max()) / K.shape[1], method="snapkv", queries=P, seed=0)
        assert snap.kept().max() >= hyb.kept().max()
        assert err(hyb) * 1.5 < err(plain)
        assert err(hyb) * 1.5 < err(snap)


def test_bad_heavy_options(llm):
    K, V, P, _ = llm
    with pytest.raises(ValueError, match="heavy_rounds"):
        balancekv.compress(K, V, keep=0.5, method="balance", heavy_rounds=-1)
    with pytest.raises(ValueError, match="heavy_pool"):
        balancekv.compress(K, V, keep=0.5, method="balance", heavy_pool=4)


def test_published_estimator_protects_heavy_hitters_per_head_on_both_paths():
    """``estimator="published"`` bills a walked token ``R log 2`` in the denominator and a heavy hitter 0. The
    heavy hitters are a head's own: every walked token of every head has ``R log 2``, and the torch path keeps the
    reference's tokens and weights. Controls (the old code): the protection test ran on the heavy hitters of all
    heads flattened (3 walked tokens of head 1 had denominator 0: head 0's heavy hitters), and on torch it raised
    (``torch.isin`` on an expanded view)."""
    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(2, 512, 32)), rng.normal(size=(2, 512, 32))
    Q = rng.normal(size=(2, 32, 32)) + K[:, -32:]
    for kw in (dict(keep=0.05), dict(keep=0.3, queries=Q)):
        a = balancekv.compress(K, V, method="balance", estimator="published", seed=0, **kw)
        tkw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        b = balancekv.compress(torch.from_numpy(K), torch.from_numpy(V), method="balance", estimator="published",
                               seed=0, **tkw)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a.positions), b.positions.numpy())
        np.testing.assert_allclose(np.asarray(a.den_logw), b.den_logw.numpy())
        nl, dl = np.asarray(a.num_logw), np.asarray(a.den_logw)
        R = a.diagnostics["level_info"][0]["rounds"]
        np.testing.assert_allclose(dl[nl > 0], R * np.log(2.0))
