"""balance-stream's prefill heavy hitters (keep mode with observed queries, option ``heavy_frac``).

The joint stream keeps ``heavy_frac`` of the budget as exact heavy-hitter slots: the first middle tokens seed them
(with their summed probe attention as scores), and every block leaving the window competes with them by score, so
at the end they hold the middle's top-scored tokens and every other token went through the sets once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fast_helpers import planted_heavy_hitters

import balancekv
from balancekv.api import relative_error


def _np(x):
    return np.asarray(x.tolist())


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_planted_heavy_hitters_are_held_exactly_and_no_token_twice(kind):
    """Checked: every planted token the probes read is in the heavy segment; each held slot's key is its position's
    input row; no position is held twice per head (a heavy hitter is not also in a set or the window: seeding the
    heavy slots with tokens that also stream would fail here); the kept count is within ``keep n``; and on fresh
    queries like the probes the error is far below the same budget without heavy hitters (control
    ``heavy_frac=0``)."""
    K, V, Qp, Qt, P = planted_heavy_hitters()
    conv = (lambda x: torch.from_numpy(x)) if kind == "torch" else (lambda x: x)
    c = balancekv.compress(conv(K), conv(V), keep=0.25, queries=conv(Qp), method="balance-stream", seed=0)
    segs = {sg.label: sg for sg in c.segments}
    hpos = _np(segs["heavy"].positions)
    assert hpos.shape[1] == round(0.3 * 128) and all(np.isin(P, hpos[h]).all() for h in range(2))
    held = [[] for _ in range(2)]
    for sg in c.segments:
        pos, ok, keys = _np(sg.positions), _np(sg.valid()).astype(bool), _np(sg.keys.dense())
        for h in range(2):
            np.testing.assert_allclose(keys[h][ok[h]], K[h, pos[h][ok[h]]], rtol=0, atol=1e-6)
            held[h] += pos[h][ok[h]].tolist()
    for h in range(2):
        assert len(held[h]) == len(set(held[h])) <= 128
    off = balancekv.compress(
        conv(K), conv(V), keep=0.25, queries=conv(Qp), method="balance-stream", seed=0, heavy_frac=0.0
    )
    assert "heavy" not in {sg.label for sg in off.segments}
    exact = balancekv.attention(conv(Qt), conv(K), conv(V))
    err = lambda x: float(np.mean(_np(relative_error(x.attend(conv(Qt)), exact))))
    assert err(c) < 0.3 * err(off)


def test_without_queries_the_build_is_heavy_frac_zeros():
    """Without observed queries there is nothing to rank by: no heavy segment, and the same cache as
    ``heavy_frac=0`` (the same layout and random numbers)."""
    K, V, _, Qt, _ = planted_heavy_hitters()
    a = balancekv.compress(K, V, keep=0.25, method="balance-stream", seed=0)
    b = balancekv.compress(K, V, keep=0.25, method="balance-stream", seed=0, heavy_frac=0.0)
    assert "heavy" not in {sg.label for sg in a.segments}
    np.testing.assert_array_equal(a.attend(Qt), b.attend(Qt))
    with pytest.raises(ValueError, match="heavy_frac"):
        balancekv.compress(K, V, keep=0.25, method="balance-stream", heavy_frac=1.0)


def test_heavy_hitters_survive_decode_appends():
    """Appended tokens stream through the window and the sets; the prefill heavy hitters keep their slots (their
    scores are the probes' attention, a new token starts at 0) and the cache stays within its slots' count."""
    K, V, Qp, Qt, P = planted_heavy_hitters()
    c = balancekv.compress(K, V, keep=0.25, queries=Qp, method="balance-stream", seed=0)
    before = c.kept().copy()
    rng = np.random.default_rng(1)
    c.append(0.3 * rng.standard_normal((2, 200, 16)), rng.standard_normal((2, 200, 16)))
    hpos = _np({sg.label: sg for sg in c.segments}["heavy"].positions)
    assert all(np.isin(P, hpos[h]).all() for h in range(2))
    assert (c.kept() <= before + 200).all() and np.isfinite(c.attend(Qt)).all()
