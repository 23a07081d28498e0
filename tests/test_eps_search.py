"""The ``eps`` search does the work once (issue 11, item 2) and stays consistent with ``keep`` mode.

- At the level it chooses for a head, ``eps`` mode returns exactly the cache ``keep`` mode builds at that
  level for the same seed (the same weighted token set, bit for bit, on the torch float32 path and on the
  NumPy reference), for every method the search shares work for.
- The chosen level meets the rule (validated error + z SE <= eps when cross-fitted), and the next level
  of its ladder was judged and fails for that head (or the ladder ends): early stopping.
- With errors that grow along the ladder, the choice equals judging every level (``budget.score`` on all
  levels, then ``cheapest_meeting``), and the judged rows hold the same numbers.
- The balance walks of several builds run in lockstep (:func:`balancekv.fast.blocked_balance.lockstep`)
  with the results of separate runs, bit for bit (padding to the largest block changes no sign).
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
from _fast_helpers import captured_eps_search, slot_table

import balancekv
from balancekv import budget
from balancekv.synthetic import make_kv

fb = importlib.import_module("balancekv.fast.blocked_balance")

CASES = [
    ("balance", {}, 0.2),
    ("uniform-halving", {}, 0.5),
    ("snapkv", {}, 0.3),
    ("h2o", {}, 0.2),
    ("balance+quant", {"group": 16}, 0.2),
    ("quant", {"group": 16}, 0.05),
]


@pytest.fixture(scope="module")
def data():
    return make_kv("llm", heads=2, n=512, d=32, q=16, seed=0)


def kinds(data, path):
    if path == "torch":
        return tuple(torch.from_numpy(x).float() for x in data)
    return data


def keep_kwargs(level):
    kw = {"keep": level.get("keep", 1.0)}
    if "bits" in level:
        kw["bits"] = level["bits"]
    return kw


@pytest.mark.parametrize("path", ["torch", "reference"])
@pytest.mark.parametrize("method,opts,eps", CASES, ids=[c[0] for c in CASES])
def test_eps_cache_is_the_keep_cache_at_the_chosen_level(data, path, method, opts, eps):
    K, V, Q = kinds(data, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = balancekv.compress(K, V, eps, method=method, queries=Q, seed=1, margin=1.0, **opts)
        choice = np.asarray(c.diagnostics["level_per_head"]).ravel()
        levels = c.diagnostics["levels"]
        assert choice.max() > 0, "the case must choose a compressed level"
        for lv in sorted(set(choice.tolist()) - {0}):
            k = balancekv.compress(K, V, method=method, queries=Q, seed=1, **opts, **keep_kwargs(levels[lv]))
            for h in np.flatnonzero(choice == lv):
                np.testing.assert_array_equal(slot_table(c, h), slot_table(k, h))


@pytest.mark.parametrize("path", ["torch", "reference"])
@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_chosen_level_meets_the_rule_and_the_search_stopped_after_it(data, path, eps):
    K, V, Q = kinds(data, path)
    c = balancekv.compress(K, V, eps, method="balance", queries=Q, seed=2, margin=1.0)
    d = c.diagnostics
    assert d["eps_rule"].startswith("cross-fitted")
    err, se = np.asarray(d["error_levels"]), np.asarray(d["error_se_levels"])
    bound = err + 1.0 * se
    choice = np.asarray(d["level_per_head"]).ravel()
    L = len(d["levels"])
    for h, k in enumerate(choice):
        if k > 0:
            assert bound[k, h] <= eps
        # early stopping: the next level was judged and fails for this head (or the ladder ends there)
        if k + 1 < L:
            assert np.isfinite(bound[k + 1, h]) and bound[k + 1, h] > eps, (h, k, bound[:, h])
    judged = np.isfinite(err[:, 0])
    assert judged[0] and not judged[choice.max() + 3 :].any()  # levels past every head's failure are not judged
    built = [i for i, info in enumerate(d["level_info"]) if info.get("built", True)]
    assert set(choice.tolist()) <= set(built) == set(d["levels_built"])


def _captured_search(K, V, Q, eps, method, **opts):
    """Run compress and capture the arguments of its eps search (the Work, the levels, the rule)."""
    return captured_eps_search(K, V, eps, method=method, queries=Q, seed=4, margin=1.0, **opts)


@pytest.mark.parametrize("path", ["torch", "reference"])
@pytest.mark.parametrize("method,opts", [("balance", {}), ("quant", {"group": 16})])
def test_early_stopping_chooses_what_judging_every_level_would(data, path, method, opts):
    K, V, Q = kinds(data, path)
    eps = 0.2 if method == "balance" else 0.05
    c, s = _captured_search(K, V, Q, eps, method, **opts)
    work, levels = s["work"], s["levels"]
    builts = [work.build(s["name"], s["meth"], s["opts"], lv) for lv in levels]
    full = budget.score(work, s["name"], s["meth"], s["opts"], levels, builts, s["cv"])
    g = budget.gap_tokens(work.n)  # the gap check of the search, on every level
    full.gap = np.stack([np.zeros(work.H)] + [work.final_errors(b, g)[1].mean(-1) for b in builts[1:]])
    ok = full.bound() <= eps
    per_head = np.array([balancekv.api.held_nbytes(b.segments, b.stream) / work.H for b in builts])
    want = budget.cheapest_meeting(full, per_head[:, None] * np.ones((1, work.H)), eps, exact_index=0)
    # (then, as compress does, one level for every head when the per-head mix would bill more bytes)
    want = budget.uniform_if_not_dearer(work, builts, want, per_head, ok)
    got = np.asarray(c.diagnostics["level_per_head"]).ravel()
    # the heads where no level past the first failing one meets eps (errors that grow along the ladder, as
    # far as the rule can tell): there early stopping must choose what judging every level chooses
    fails = [np.flatnonzero(~ok[1:, h]) for h in range(work.H)]
    clean = [h for h, f in enumerate(fails) if f.size == 0 or not ok[2 + f[0] :, h].any()]
    assert clean, "no head with errors growing along the ladder on this data"
    np.testing.assert_array_equal(got[clean], want[clean])
    assert np.all(ok[got, np.arange(work.H)])  # every choice meets the rule
    sc = s["scores"]
    judged = np.isfinite(sc.err[:, 0])
    np.testing.assert_array_equal(sc.err[judged], full.err[judged])
    np.testing.assert_array_equal(sc.se[judged], full.se[judged])


def _walk_kwargs(n, seed, **over):
    kw = dict(
        itrs=3,
        block=32,
        sink=4,
        window=4,
        scale=0.25,
        rng=np.random.default_rng(seed),
        gamma=4.0,
        a2=0.0,
        value_centering=True,
    )
    kw.update(over)
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lockstep_builds_equal_separate_builds(dtype):
    """Builds of different sizes (blocks of 32 next to blocks of 7 and of 3, padded in the joint loop), kernels,
    walk normalisations and protected sets: in lockstep each gives its separate result, bit for bit."""
    K, V, Q = (torch.from_numpy(x).to(dtype) for x in make_kv("llm", heads=2, n=160, d=16, q=12, seed=3))
    prot = torch.tensor([[20, 50, 70], [30, 31, 90]])
    configs = [
        _walk_kwargs(160, 0, kernel="queries", probes=Q),
        _walk_kwargs(160, 1, kernel="queries", probes=Q[:, :6], itrs=6, protect=prot),
        _walk_kwargs(160, 2, itrs=5, gamma=64.0, temp=0.25, a2=1.0, gamma_norm="token", a2_mode="rel"),
        _walk_kwargs(160, 3, kernel="queries", probes=Q, itrs=4, block=7),
    ]
    alone = []
    for kw in configs:
        alone.append(fb.blocked_balance(K, V, **{**kw, "rng": np.random.default_rng(kw["rng"].bit_generator.seed_seq)}))
    together = fb.lockstep([fb.blocked_balance_rounds(K, V, **kw) for kw in configs])
    for (i1, l1), (i2, l2) in zip(alone, together):
        assert torch.equal(i1, i2) and torch.equal(l1, l2)


@pytest.mark.parametrize("method,opts,eps", CASES, ids=[c[0] for c in CASES])
def test_eps_search_on_torch_never_converts_to_numpy(data, method, opts, eps):
    K, V, Q = kinds(data, "torch")

    def refuse(*a, **k):
        raise AssertionError("a tensor was converted to NumPy on the torch path")

    saved = torch.Tensor.numpy, torch.Tensor.__array__
    torch.Tensor.numpy, torch.Tensor.__array__ = refuse, refuse
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = balancekv.compress(K, V, eps, method=method, queries=Q, seed=0, margin=1.0, **opts)
    finally:
        torch.Tensor.numpy, torch.Tensor.__array__ = saved
    assert torch.is_tensor(c.positions)


def test_balance_quant_eps_is_monotone_along_its_ladders_not_across_them():
    """``balance+quant``'s eps search judges one ladder per bit width; the choice is monotone along each ladder,
    as judged. Below one quantization group a level keeps its tokens unquantized (keep 1/32 of 512 tokens: 16
    tokens, 16768 bytes), and ranked by bytes across every ladder that failing level vetoed every cheaper level of
    every bit width: the cache held 18432 bytes where levels of 4608-6656 bytes met eps on both heads."""
    rng = np.random.default_rng(0)
    K, V = 0.5 * rng.normal(size=(2, 512, 32)), rng.normal(size=(2, 512, 32)) + 1
    Q = 0.5 * rng.normal(size=(2, 32, 32)) + 0.5 * K[:, -32:]
    c = balancekv.compress(K, V, 0.3, method="balance+quant", queries=Q, seed=0)
    d = c.diagnostics
    assert np.all(np.asarray(d["error_bound_per_head"]) <= 0.3)
    assert c.nbytes <= 6656, c.nbytes
