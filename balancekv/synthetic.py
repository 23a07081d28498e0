"""Seeded synthetic KV caches, the families every test and benchmark draws from.

Each family returns ``(K, V, Q)`` NumPy float64 arrays of shapes
``(heads, n, d)``, ``(heads, n, s)``, ``(heads, q, d)``:

- ``gaussian``: i.i.d. standard normal keys, values and queries;
- ``bounded``: keys and queries on the sphere of radius ``r`` with
  ``scale * r^2 = 1`` (the theory's regime, SPEC 4b), Gaussian values;
- ``clustered``: keys near ``clusters`` centres (SubGen's ``(m, delta)``-clusterable
  streams), queries near the centres;
- ``llm``: a crude imitation of real post-RoPE keys: a shared offset, a few
  large "outlier" channels, values with a shared mean and heavy-tailed
  spread, and queries correlated with the keys.
"""

from __future__ import annotations

import numpy as np

FAMILIES = ("gaussian", "bounded", "clustered", "llm")


def make_kv(
    family: str = "gaussian",
    heads: int = 2,
    n: int = 256,
    d: int = 32,
    s: int | None = None,
    q: int = 16,
    seed: int = 0,
    clusters: int = 8,
    radius: float = 0.1,
):
    s = d if s is None else s
    rng = np.random.default_rng([seed, heads, n, d, s, q, FAMILIES.index(family) if family in FAMILIES else 99])
    if family == "gaussian":
        K = rng.normal(size=(heads, n, d))
        V = rng.normal(size=(heads, n, s))
        Q = rng.normal(size=(heads, q, d))
    elif family == "bounded":
        r = d**0.25  # scale * r^2 = r^2 / sqrt(d) = 1
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        K = r * unit(rng.normal(size=(heads, n, d)))
        Q = r * unit(rng.normal(size=(heads, q, d)))
        V = rng.normal(size=(heads, n, s))
    elif family == "clustered":
        centres = rng.normal(size=(heads, clusters, d)) * 2.0
        lab = rng.integers(0, clusters, size=(heads, n))
        K = np.take_along_axis(centres, lab[..., None], axis=1) + radius * rng.normal(size=(heads, n, d)) / np.sqrt(d)
        V = rng.normal(size=(heads, n, s))
        qlab = rng.integers(0, clusters, size=(heads, q))
        Q = np.take_along_axis(centres, qlab[..., None], axis=1) + 0.5 * rng.normal(size=(heads, q, d))
    elif family == "llm":
        offset = rng.normal(size=(heads, 1, d)) * 2.0
        chan = np.ones(d)
        chan[rng.choice(d, size=max(1, d // 16), replace=False)] = 6.0
        K = offset + rng.normal(size=(heads, n, d)) * chan
        # real values share a large common component (it cancels in the softmax ratio)
        V = rng.normal(size=(heads, 1, s)) + rng.normal(size=(heads, n, s)) * rng.lognormal(
            0.0, 0.5, size=(heads, n, 1)
        )
        Q = 0.5 * K[:, rng.integers(0, n, size=q)] + rng.normal(size=(heads, q, d))
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return K, V, Q
