"""Every bad input of SPEC section 9 raises the named error, and no caller array is modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import balancekv


def fresh():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 16, 4)), rng.normal(size=(2, 16, 4)), rng.normal(size=(2, 3, 4))


def with_nan(x):
    x = x.copy()
    x[0, 1, 2] = np.nan
    return x


def with_inf(x):
    x = x.copy()
    x[1, 0, 0] = -np.inf
    return x


K0, V0, Q0 = fresh()
CASES = [
    # (description, kwargs for compress, error type, message fragment)
    ("leading dims differ", dict(K=K0, V=V0[:1]), ValueError, "leading"),
    ("token counts differ", dict(K=K0, V=V0[:, :8]), ValueError, "number of tokens"),
    ("NaN in K", dict(K=with_nan(K0), V=V0), ValueError, "K contains NaN"),
    ("Inf in V", dict(K=K0, V=with_inf(V0)), ValueError, "V contains NaN or Inf"),
    ("integer K", dict(K=np.ones((2, 16, 4), dtype=np.int64), V=V0), TypeError, "K must have a real floating"),
    ("complex V", dict(K=K0, V=V0.astype(np.complex128)), TypeError, "V must have a real floating"),
    ("list K", dict(K=K0.tolist(), V=V0), TypeError, "K must be a numpy"),
    ("1-D K", dict(K=K0[0, 0], V=V0), ValueError, "K must have at least 2"),
    ("empty cache", dict(K=K0[:, :0], V=V0[:, :0]), ValueError, "empty"),
    ("eps = 0", dict(K=K0, V=V0, eps=0.0), ValueError, "eps must lie in"),
    ("eps = 1", dict(K=K0, V=V0, eps=1.0), ValueError, "eps must lie in"),
    ("eps NaN", dict(K=K0, V=V0, eps=float("nan")), ValueError, "eps must lie in"),
    ("eps string", dict(K=K0, V=V0, eps="0.1"), TypeError, "eps must be a real"),
    ("both eps and keep", dict(K=K0, V=V0, eps=0.1, keep=0.5), ValueError, "exactly one of eps"),
    ("neither eps nor keep", dict(K=K0, V=V0), ValueError, "exactly one of eps"),
    ("keep 0", dict(K=K0, V=V0, keep=0.0), ValueError, "keep must lie in"),
    ("keep > 1", dict(K=K0, V=V0, keep=1.5), ValueError, "keep must lie in"),
    ("unknown method", dict(K=K0, V=V0, eps=0.1, method="nope"), ValueError, "unknown method 'nope'"),
    ("unknown option", dict(K=K0, V=V0, eps=0.1, method="uniform", bogus=3), TypeError, "unknown option"),
    ("bad option value", dict(K=K0, V=V0, keep=0.5, method="streaming", sink=-1), ValueError, "sink"),
    ("bad guarantee", dict(K=K0, V=V0, eps=0.1, guarantee="maybe"), ValueError, "guarantee must be"),
    ("no theorem", dict(K=K0, V=V0, eps=0.1, method="uniform", guarantee="theorem"), ValueError, "no theorem"),
    ("bad delta", dict(K=K0, V=V0, eps=0.1, delta=2.0), ValueError, "delta must lie in"),
    ("bad scale", dict(K=K0, V=V0, eps=0.1, scale=-1.0), ValueError, "scale must be finite and positive"),
    ("bad seed", dict(K=K0, V=V0, eps=0.1, seed=1.5), TypeError, "seed must be"),
    ("bad backend", dict(K=K0, V=V0, eps=0.1, backend="cuda"), ValueError, "backend must be"),
    ("queries with wrong d", dict(K=K0, V=V0, eps=0.1, queries=Q0[..., :3]), ValueError, "key dimension"),
    ("queries with wrong heads", dict(K=K0, V=V0, eps=0.1, queries=Q0[:1]), ValueError, "leading"),
    ("queries with NaN", dict(K=K0, V=V0, eps=0.1, queries=with_nan(Q0)), ValueError, "queries contains NaN"),
    ("numpy K torch V", dict(K=K0, V=torch.tensor(V0)), TypeError, "numpy arrays or all torch"),
    ("exact with keep<1", dict(K=K0, V=V0, keep=0.5, method="exact"), ValueError, "keeps every token"),
]


@pytest.mark.parametrize("desc,kwargs,err,msg", CASES, ids=[c[0] for c in CASES])
def test_compress_rejects_bad_input(desc, kwargs, err, msg):
    kwargs = dict(kwargs)
    K, V = kwargs.pop("K"), kwargs.pop("V")
    kwargs.setdefault("method", "uniform")
    if "eps" not in kwargs and "keep" not in kwargs and desc != "neither eps nor keep":
        kwargs["eps"] = 0.1
    snapshots = [np.array(x, copy=True) if isinstance(x, np.ndarray) else None for x in (K, V)]
    with pytest.raises(err, match=msg):
        balancekv.compress(K, V, **kwargs)
    for x, snap in zip((K, V), snapshots):
        if snap is not None:
            np.testing.assert_array_equal(x, snap)


def test_attention_and_attend_reject_bad_queries():
    K, V, Q = fresh()
    c = balancekv.compress(K, V, keep=0.5, method="uniform", seed=0)
    with pytest.raises(ValueError, match="Q must have the key dimension"):
        c.attend(Q[..., :2])
    with pytest.raises(ValueError, match="Q must have the cache's leading"):
        c.attend(Q[None])
    with pytest.raises(ValueError, match="Q contains NaN"):
        c.attend(with_nan(Q))
    with pytest.raises(TypeError, match="Q must have a real floating"):
        c.attend(Q.astype(np.int32))
    with pytest.raises(ValueError, match="Q holds no queries"):
        c.attend(Q[:, :0])
    with pytest.raises(ValueError, match="positions must be integers"):
        c.attend(Q, positions=np.arange(2))
    with pytest.raises(ValueError, match="Q must have the key dimension"):
        balancekv.attention(Q[..., :2], K, V)
    with pytest.raises(ValueError, match="K and V must have the same number of tokens"):
        balancekv.attention(Q, K, V[:, :3])
    # attention has no cache: its errors name the keys
    with pytest.raises(ValueError, match="Q must have K's leading"):
        balancekv.attention(Q[None], K, V)
    with pytest.raises(TypeError, match="Q and K must all be numpy arrays or all torch tensors"):
        balancekv.attention(Q, torch.from_numpy(K), torch.from_numpy(V))
    # margin belongs to the eps rule: refused with keep (hf.CompressedCache refuses it too)
    with pytest.raises(ValueError, match="margin is the eps rule's"):
        balancekv.compress(K, V, keep=0.5, margin=5.0)
    with pytest.raises(ValueError, match="backend must be"):
        c.attend(Q, backend="gpu")
    # backend="triton" where no kernel can run: refused for every method (uniform has no kernel and ran torch)
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        for arrays in ((K, V), (torch.from_numpy(K), torch.from_numpy(V))):
            with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
                balancekv.compress(*arrays, keep=0.5, method="uniform", backend="triton")


def test_append_rejects_bad_tokens():
    K, V, _ = fresh()
    c = balancekv.compress(K, V, keep=0.5, method="uniform", seed=0)
    with pytest.raises(ValueError, match="k must have the cache's leading"):
        c.append(K[:1, :2], V[:1, :2])
    with pytest.raises(ValueError, match="feature dims"):
        c.append(K[..., :2, :3], V[..., :2, :3])
    with pytest.raises(ValueError, match="k contains NaN"):
        c.append(with_nan(K)[:, :3], V[:, :3])
    with pytest.raises(TypeError, match="numpy arrays or all torch"):
        c.append(torch.tensor(K[:, :2]), torch.tensor(V[:, :2]))


def test_caller_arrays_never_modified():
    K, V, Q = fresh()
    Kt, Vt, Qt = torch.tensor(K), torch.tensor(V), torch.tensor(Q)
    snaps = [x.copy() for x in (K, V, Q)] + [x.clone() for x in (Kt, Vt, Qt)]
    for method in balancekv.available_methods():
        try:
            c = balancekv.compress(K, V, 0.2, method=method, queries=Q, seed=0)
        except ValueError:
            continue
        c.attend(Q)
        c.append(K[:, :2], V[:, :2])
        ct = balancekv.compress(Kt, Vt, 0.2, method=method, queries=Qt, seed=0)
        ct.attend(Qt)
        ct.append(Kt[:, :2], Vt[:, :2])
    for x, snap in zip((K, V, Q, Kt, Vt, Qt), snaps):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, snap)
        else:
            assert torch.equal(x, snap)
