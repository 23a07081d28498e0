"""The probe errors a ``compress`` call judges its levels by (``Work.final_errors``, ``Work.query_errors``).

On the torch path one logit matrix per build serves the in-sample error and the gap check, and a build whose keys
are rows of the working keys (``storage.KEY_ROWS``) takes its logits from the probes' logits over those keys
(issue 11, item 2: do the work once). These shortcuts must give the numbers of the definition:

- every segment marked ``KEY_ROWS`` holds, at each valid slot, exactly the key row of its position (a mark that
  lies would score a cache that is not the one returned); the check is shown to catch a slot changed by 1e-9;
- the errors, gap errors and fold (held-out rows) errors of torch float64 builds equal the reference estimator
  (``balancekv.reference.weighted_attention`` with a position mask) run by hand on the same slots, to 1e-9, for
  marked builds (``balance``, ``uniform-halving``, ``uniform``, ``h2o``, ``snapkv``) and unmarked ones
  (``quant``: dequantized keys; ``streaming``: a stream's window). Controls, checked by breaking the code: logits
  gathered at the next position, or the gap check not hiding the last tokens, fail here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fast_helpers import captured_eps_search
from balancekv.reference import softmax_attention as ra

from balancekv import budget
from balancekv.storage import KEY_ROWS
from balancekv.synthetic import make_kv

MARKED = ["balance", "uniform-halving", "uniform", "h2o", "snapkv"]
UNMARKED = ["quant", "streaming", "subgen"]
#: two weight sets whose maxima differ (the published estimator's denominator is 2^R per halved token)
TWO_SETS = [("balance", {"estimator": "published"})]


@pytest.fixture(scope="module")
def data():
    return make_kv("llm", heads=2, n=384, d=32, q=24, seed=3)


def captured_work(data, method, kind, queries=True, **opts):
    """The ``Work`` of an eps-mode ``compress`` call (its arrays, probes and shared logits), and the method."""
    K, V, Q = data
    if kind == "torch":
        K, V, Q = (torch.from_numpy(x) for x in (K, V, Q))  # float64: the torch path computes in float64
    return captured_eps_search(K, V, 0.2, method=method, queries=Q if queries else None, seed=1, **opts)[1]


def host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def key_rows_mismatch(seg, Kw) -> float:
    """Largest ``|key - Kw[position]|`` over a segment's valid slots."""
    K, pos = host(seg.keys.dense()), host(seg.positions).astype(np.int64)
    ok = host(seg.valid()).astype(bool)
    rows = np.take_along_axis(host(Kw), np.clip(pos, 0, None)[..., None], axis=-2)
    return float(np.abs(np.where(ok[..., None], K - rows, 0.0)).max())


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("queries", [True, False], ids=["queries", "no-queries"])
@pytest.mark.parametrize("method", MARKED)
def test_a_key_rows_segment_holds_the_rows_of_its_positions(data, method, kind, queries):
    s = captured_work(data, method, kind, queries)
    work = s["work"]
    marked = 0
    for lv in s["levels"][1:]:
        for sg in work.build(method, s["meth"], s["opts"], lv).segments:
            if sg.meta.get(KEY_ROWS):
                marked += 1
                assert key_rows_mismatch(sg, work.Kw) == 0.0, (method, lv)
    assert marked, f"{method} marks no segment: the shortcut is never taken"
    # control: the check sees a single slot moved by 1e-9
    sg = work.build(method, s["meth"], s["opts"], s["levels"][1]).segments[0]
    keys = sg.keys.dense()
    keys[0, 0, 0] += 1e-9
    assert key_rows_mismatch(sg, work.Kw) > 0.0


def errors_by_hand(work, built, rows, hide: int):
    """The reference estimator over the build's slots (NumPy float64): per-query relative errors of the probes
    ``rows`` against their exact attention, the slots at positions ``>= n - hide`` hidden from both."""
    segs = built.segments
    K = np.concatenate([host(s.keys.dense()) for s in segs], -2)
    Vv = np.concatenate([host(s.values.dense()) for s in segs], -2)
    nl = np.concatenate([host(s.num_logw) for s in segs], -1)
    dl = np.concatenate([host(s.den_logw) for s in segs], -1)
    pos = np.concatenate([host(s.positions) for s in segs], -1)
    Q = host(work.probes)[:, rows]
    cut = work.n - hide
    mask = (pos < cut)[:, None, :]
    z = ra.weighted_attention(Q, K, Vv, nl, dl, work.scale, mask=mask)
    ex = ra.attention(Q, host(work.Kw)[:, :cut], host(work.Vw)[:, :cut], work.scale)
    return ra.relative_error(z, ex)


@pytest.mark.parametrize(
    "method,opts", [(m, {}) for m in MARKED + UNMARKED] + TWO_SETS, ids=MARKED + UNMARKED + ["balance-published"]
)
def test_torch_probe_errors_are_the_reference_estimator_on_the_same_slots(data, method, opts):
    s = captured_work(data, method, "torch", **opts)
    work = s["work"]
    p = int(work.probes.shape[-2])
    g = budget.gap_tokens(work.n)
    every = np.arange(p)
    held = np.arange(p // 2, p)
    for lv in s["levels"][1:3]:
        b = work.build(method, s["meth"], s["opts"], lv)
        if method in MARKED:
            assert all(sg.meta.get(KEY_ROWS) for sg in b.segments)  # the shortcut path is the one measured
        if opts:
            assert not all(torch.equal(sg.num_logw, sg.den_logw) for sg in b.segments)  # two sets indeed
        e, eg = work.final_errors(b, g)
        np.testing.assert_allclose(e, errors_by_hand(work, b, every, 0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(eg, errors_by_hand(work, b, every, g), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(work.query_errors(b, held), errors_by_hand(work, b, held, 0), rtol=1e-9, atol=1e-12)
