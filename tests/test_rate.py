"""The 1/m versus 1/sqrt(m) rate (SPEC section 3, "Recursion"; [BKV] Thm 3.4 vs sampling).

Regime, and why: halving T times keeps m = n/2^T tokens of weight 2^T; each round's
error is one walk's discrepancy D (size-independent), so the error is about 2^T D / n
= D/m only if each round is ONE walk over the whole middle. With fixed blocks of b
tokens the n/b independent block discrepancies add like sqrt(n/b) and the rate falls
back to 1/sqrt(m b). So `balance` runs with block >= n, no sink/window (everything is
compressed), on the `bounded` family (scale*r^2 = 1: the kernel is well conditioned,
the regime of the theorem). m ranges over 512..64 of n = 2048: below m = 64 the
balanced estimate leaves its discrepancy regime (at m = 32 its error blows up past
uniform's: the relative error is > 1 and the ratio estimate is no longer linear in
the sum errors), so those m are not part of a rate statement.

`uniform` samples without replacement, whose error is proportional to
sqrt(1/m - 1/n), not 1/sqrt(m); its slope is fitted against the finite-population
sample size m_eff = 1/(1/m - 1/n) (the standard correction; at m = n/4 it changes m by
a third). `balance`'s slope is fitted against m itself.

Error metric: mean over queries of ||z(q) - Attn(q)||, divided by the mean ||Attn(q)||
(one constant per data set, so the slope is that of the absolute error; per-query
relative errors are dominated by queries whose exact output is nearly 0).
Data and compression seeds are fixed: the test is deterministic.
"""

import numpy as np
from balancekv.reference.softmax_attention import attention

import balancekv
from balancekv.synthetic import make_kv

N = 2048
TS = (2, 3, 4, 5)


def errors(method, **opts):
    out = []
    for T in TS:
        es = []
        for ds in range(2):
            K, V, Q = make_kv("bounded", heads=2, n=N, d=16, q=32, seed=700 + ds)
            ex = attention(Q, K, V)
            for seed in range(2):
                ckv = balancekv.compress(K, V, keep=2.0**-T, method=method, seed=seed, **opts)
                es.append(np.linalg.norm(ckv.attend(Q) - ex, axis=-1).mean() / np.linalg.norm(ex, axis=-1).mean())
        out.append(np.mean(es))
    return np.array(out)


def slope(err, finite_population=False):
    m = N / 2.0 ** np.array(TS)
    if finite_population:
        m = 1.0 / (1.0 / m - 1.0 / N)
    return np.polyfit(np.log(m), np.log(err), 1)[0]


def test_balance_error_falls_like_one_over_m_and_uniform_like_one_over_sqrt_m():
    eb = errors("balance", block=N, sink=0, window=0)
    eu = errors("uniform")
    sb, su = slope(eb), slope(eu, finite_population=True)
    assert sb <= -0.8, (sb, eb)
    assert -0.6 <= su <= -0.4, (su, eu)
    assert np.all(eb < eu)
