"""The Fig. 1 pipeline ([BKV] single-layer protocol), the middle-compression helper and the bounds table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from balancekv import models
from balancekv.cli import main as cli_main
from balancekv.experiments import bounds_table as bt
from balancekv.experiments.fig1 import Fig1Config, causal_exact, run_fig1, synthetic_problems, write_results
from balancekv.experiments.middle import compress_middle, middle_options
from balancekv.methods import available_methods
from balancekv.synthetic import make_kv

TINY = dict(n=192, layers=(0,), head=32, tail=32, queries=32, probes=16, seeds=1)


def _rows(cfg):
    return {
        (r["method"], r["rate"]): r
        for r in run_fig1(cfg, problems=synthetic_problems, progress=False, log=lambda s: None)
    }


def test_fig1_tiny_synthetic_run_is_finite_and_exact_is_exact():
    """Exact (and uniform at rate 1, which keeps every token with weight n/n = 1) has error 0 and
    cache ratio 1; every other number is finite; uniform's error grows from rate 1/2 to 1/8 (fixed
    seed, deterministic)."""
    extra = [m for m in ("balance", "quant") if m in available_methods()]
    cfg = Fig1Config(methods=("exact", "uniform", *extra), rates=(1.0, 0.5, 0.125), **TINY)
    rows = _rows(cfg)
    assert not [r for r in rows.values() if r.get("failed")]
    assert rows[("exact", 1.0)]["error"] < 1e-12
    assert 1.0 <= rows[("exact", 1.0)]["ratio"] <= 1.1  # every token + weights and positions
    assert ("exact", 0.5) not in rows  # the exact cache has a single point
    assert rows[("uniform", 1.0)]["error"] < 1e-12
    assert 0 < rows[("uniform", 0.5)]["error"] < rows[("uniform", 0.125)]["error"]
    assert rows[("uniform", 0.5)]["kept_middle"] == pytest.approx(0.5)
    assert rows[("uniform", 0.125)]["ratio"] < rows[("uniform", 0.5)]["ratio"] < 1
    for r in rows.values():
        assert np.isfinite(r["error"]) and np.isfinite(r["ratio"])
    if "quant" in rows:
        assert [rate for m, rate in rows if m == "quant"] == [1.0]


def test_unknown_methods_and_options_are_refused_before_the_run():
    """A method that is not registered, or an option it does not take, is a ValueError before any layer runs (the
    run skipped unknown names, so a typo gave an empty report, and ran every layer for a bad option, then failed
    every point); through the CLI it is a usage error."""
    for spec, msg in (("no-such-method", "not a registered method"), ("balance:foo=1", "unknown option")):
        cfg = Fig1Config(methods=("uniform", spec), rates=(0.5,), **TINY)
        with pytest.raises(ValueError, match=msg):
            run_fig1(cfg, problems=synthetic_problems, progress=False, log=lambda s: None)


def test_compress_middle_keeps_ends_exact_and_is_causal():
    """Head and tail slots hold exactly the input tokens at their stream positions, the middle slots come
    from [head, n - tail), inputs are untouched, and with the exact method causal ``attend`` equals
    exact causal attention."""
    K, V, Q = make_kv("gaussian", heads=2, n=100, d=8, q=10, seed=3)
    K0, V0 = K.copy(), V.copy()
    ckv = compress_middle(K, V, method="uniform", keep=0.25, head=20, tail=30, seed=1)
    np.testing.assert_array_equal(K, K0)
    np.testing.assert_array_equal(V, V0)
    pos = ckv.positions
    head, mid, tail = ckv.segments[0], ckv.segments[1:-1], ckv.segments[-1]
    np.testing.assert_array_equal(head.positions, np.broadcast_to(np.arange(20), (2, 20)))
    np.testing.assert_array_equal(tail.positions, np.broadcast_to(np.arange(70, 100), (2, 30)))
    np.testing.assert_array_equal(head.keys.dense(), K[:, :20])
    mid_pos = np.concatenate([s.positions for s in mid], axis=-1)
    assert np.all((mid_pos >= 20) & (mid_pos < 70))
    assert (pos >= 0).sum(axis=-1).tolist() == [20 + round(0.25 * 50) + 30] * 2
    # causality against the reference
    from balancekv.experiments.real_data import KVProblem

    prob = KVProblem(K, V, Q, np.arange(90, 100), 1 / np.sqrt(8), "t")
    ex = compress_middle(K, V, method="exact", keep=1.0, head=20, tail=30)
    np.testing.assert_allclose(ex.attend(Q, positions=prob.qpos), causal_exact(prob), rtol=1e-12, atol=1e-12)
    # masking really happens: the last-position query differs from the first
    full = ex.attend(Q)
    assert np.abs(full[:, 0] - ex.attend(Q, positions=prob.qpos)[:, 0]).max() > 1e-6


def test_middle_options_zero_the_edges_only_where_accepted():
    if "balance" in available_methods():
        assert middle_options("balance")["sink"] == 0 and middle_options("balance")["window"] == 0
    if "snapkv" in available_methods():
        assert "window" not in middle_options("snapkv")  # its observation window must be >= 1
    assert middle_options("uniform") == {}


def test_compress_middle_rejects_bad_ends():
    K, V, _ = make_kv("gaussian", heads=1, n=10, d=4, q=1, seed=0)
    with pytest.raises(ValueError, match="head and tail"):
        compress_middle(K, V, method="uniform", keep=0.5, head=-1, tail=2)
    with pytest.raises(ValueError, match="nothing left"):
        compress_middle(K, V, method="uniform", keep=0.5, head=5, tail=5)


def test_write_results_and_cli(tmp_path, capsys):
    cfg = Fig1Config(methods=("exact", "uniform"), rates=(0.5, 0.25), **TINY)
    rows = run_fig1(cfg, problems=synthetic_problems, progress=False, log=lambda s: None)
    paths = write_results(rows, cfg, tmp_path, stem="t")
    for key in ("md", "json", "png_kept", "png_bytes"):
        assert paths[key].exists() and paths[key].stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(rows) == 3
    assert "| uniform |" in paths["md"].read_text()
    rc = cli_main(
        [
            "reproduce",
            "fig1",
            "--synthetic",
            "--n",
            "640",
            "--layers",
            "0",
            "--methods",
            "uniform",
            "--no-progress",
            "--no-plot",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "uniform" in out and (tmp_path / "cli" / "fig1_synthetic_n640.md").exists()


@pytest.mark.slow
@pytest.mark.hf
def test_fig1_tiny_real_smollm2(tmp_path, monkeypatch):
    """One real-model run: SmolLM2 layer 1, n=512; exact is exact, uniform at 1/2 is not, all finite."""
    try:
        models.check_available("smollm2")
    except ImportError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("BALANCEKV_CACHE", str(tmp_path))
    cfg = Fig1Config(
        n=512,
        layers=(1,),
        methods=("exact", "uniform"),
        rates=(1.0, 0.5),
        head=128,
        tail=128,
        queries=64,
        probes=32,
        text="python-docs",
    )
    rows = {(r["method"], r["rate"]): r for r in run_fig1(cfg, progress=False, log=lambda s: None)}
    assert rows[("exact", 1.0)]["error"] < 1e-12
    assert rows[("uniform", 1.0)]["error"] < 1e-12
    assert 0 < rows[("uniform", 0.5)]["error"] < 1
    assert "smollm2 layer 1" in rows[("uniform", 0.5)]["data"]


# ---------------------------------------------------------------------- bounds table machinery
def test_bounds_table_reports_worst_ratio_and_unavailable():
    ok = bt.BoundCheck(
        "ok",
        "src",
        "balancekv.bounds.quantization.element_error_bound",
        lambda seed: (np.array([0.1, 0.5 + 0.1 * seed]), np.array([1.0, 1.0])),
    )
    bad = bt.BoundCheck(
        "bad",
        "src",
        "balancekv.bounds.quantization.element_error_bound",
        lambda seed: (np.array([2.0]), np.array([1.0])),
    )
    missing = bt.BoundCheck("missing", "src", "balancekv.bounds.walk.no_such_bound", lambda seed: (0, 1))
    r = bt.evaluate(ok, seeds=range(3))
    assert r["status"] == "held" and r["ratio"] == pytest.approx(0.7) and r["worst_seed"] == 2
    assert r["instances"] == 6
    assert bt.evaluate(bad, seeds=[0])["status"] == "VIOLATED"
    assert bt.evaluate(missing)["status"] == "unavailable"
    md = bt.markdown_table([r, bt.evaluate(missing)])
    assert "not implemented yet" in md and "| ok |" in md


def test_registered_bound_checks_hold_on_one_seed():
    """Every registered deterministic bound holds (observed / bound <= 1) on seed 0."""
    for row in bt.run_bounds(seeds=[0], progress=False):
        if row["status"] != "unavailable" and not row["probabilistic"]:
            assert row["ratio"] <= 1, row


def test_method_spec_parsing():
    from balancekv.experiments.fig1 import parse_method_spec

    assert parse_method_spec("balance") == ("balance", {})
    assert parse_method_spec("balance+quant:bits=8,policy=kivi,a2=0.5,value_centering=False") == (
        "balance+quant",
        {"bits": 8, "policy": "kivi", "a2": 0.5, "value_centering": False},
    )
    with pytest.raises(ValueError, match="method spec"):
        parse_method_spec("quant:bits")
