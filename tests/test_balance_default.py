"""Issue 12 item 5: the recommended no-query options of ``balance`` beat ``uniform-halving`` on every family.

Written against explicit option values of the NumPy reference
(:func:`balancekv.reference.blocked_balance.blocked_balance`), not against the method's current
defaults: the engineer porting ``balance`` flips ``Balance.defaults`` to these values (evidence:
``benchmarks/balance_default_choice.py``, ``benchmarks/README.md``). Seeded and deterministic:
mean relative error on the family's held-out queries over 2 data sets x 2 compression seeds,
at keep 1/4 and 1/8 of the middle (n=512) (equal kept tokens for both: same block, sink, window, halving).
"""

import numpy as np
import pytest
from balancekv.reference.blocked_balance import blocked_balance
from balancekv.reference.softmax_attention import attention, relative_error, weighted_attention

from balancekv.synthetic import FAMILIES, make_kv

#: the recommended options for ``balance`` without queries (kernel "keys", heavy_rounds 0)
RECOMMENDED = {
    "value_centering": False,
    "a2": 1.0,
    "a2_mode": "rel",
    "gamma": 64.0,
    "gamma_norm": "token",
    "temp": 0.25,
    "block": 64,
    "halving": "block",
    "sink": 32,
    "window": 32,
}


def mean_error(family, itrs, gamma, opts):
    errs = []
    for ds in range(2):
        K, V, Q = make_kv(family, heads=2, n=512, d=16, q=32, seed=500 + ds)
        exact = attention(Q, K, V)
        for seed in range(2):
            rng = np.random.default_rng(seed)
            idx, lw = blocked_balance(K, V, itrs=itrs, scale=0.25, rng=rng, **{**opts, "gamma": gamma})
            h = np.arange(K.shape[0])[:, None]
            errs.append(relative_error(weighted_attention(Q, K[h, idx], V[h, idx], lw, lw, 0.25), exact).mean())
    return float(np.mean(errs))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("itrs", [2, 3])
def test_recommended_balance_beats_uniform_halving(family, itrs):
    eb = mean_error(family, itrs, RECOMMENDED["gamma"], RECOMMENDED)
    eu = mean_error(family, itrs, 0.0, RECOMMENDED)  # gamma = 0: uniform-halving, same procedure
    assert eb < 0.95 * eu, (family, itrs, eb, eu)
