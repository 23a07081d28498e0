"""The command line: usage errors exit 2 before any work, --version, defaults in help, run folders,
byte-identical re-runs."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

import balancekv
from balancekv import cli
from balancekv.experiments import results


def _usage_error(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--keep", "2"], "--keep: must be a fraction in (0, 1], got 2"),
        (["demo", "--keep", "0"], "--keep: must be a fraction in (0, 1], got 0"),
        (["demo", "--keep", "-1"], "--keep: must be a fraction in (0, 1], got -1"),
        (["demo", "--keep", "nan"], "--keep: expected a finite number"),
        (["demo", "--eps", "5"], "--eps: must lie in (0, 1), got 5"),
        (["demo", "--n", "0"], "--n: must be an integer >= 128, got 0"),
        (["demo", "--seed", "-3"], "--seed: must be an integer >= 0"),
        (["reproduce", "bounds", "--only", "X"], "--only: unknown check 'X'; available:"),
        (["reproduce", "bounds", "--seeds", "0"], "--seeds: must be an integer >= 1"),
        (["reproduce", "fig1", "--synthetic", "--n", "64"], "n=64 leaves no middle between head=256 and tail=256"),
        (["reproduce", "fig1", "--layers", "1", "30"], "--layers: smollm2 has layers 0..29, got [30]"),
        (["eval", "--keeps", "7"], "--keeps: must be a fraction in (0, 1], got 7"),
        (["eval", "--methods", "bogus"], "--methods: unknown method 'bogus'; available:"),
        (["eval", "--n-prefix", "-1"], "--n-prefix: must be an integer >= 128, got -1"),
        (["eval", "--n-cont", "1"], "--n-cont: must be an integer >= 2"),
        (["eval", "--depths", "1.5"], "--depths: must lie in [0, 1]"),
        (["reproduce", "fig1", "--synthetic", "--methods", "nope"], "'nope' is not a registered method"),
        (["reproduce", "fig1", "--synthetic", "--methods", "balance:foo=1"], "unknown option"),
        (["reproduce", "fig1", "--replot", "missing.json"], "--replot: 'missing.json' does not exist"),
        (["eval", "--replot", "no-such-dir"], "--replot: 'no-such-dir/eval_smollm2.json' does not exist"),
        (["reproduce", "fig1", "--synthetic", "--text", "numpy-license"], "--synthetic: --text choose a real model's"),
        (["demo", "--n", "100000"], "--n: the SmolLM2 layer of --data auto takes at most 8192 tokens"),
        (["reproduce", "fig1", "--text", "hello world", "--n", "600"], "--text: 'hello world' is not one of"),
        (["reproduce", "bounds", "--out", "/proc/no-such/x"], "--out: cannot write to '/proc/no-such/x'"),
    ],
)
def test_bad_values_are_usage_errors(argv, needle, capsys, monkeypatch, tmp_path):
    """Exit 2 with the argument named, and nothing run: the model loader must not be reached (it would
    raise here) and no run folder is created."""
    import balancekv.models as models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    _usage_error(argv, capsys, needle)
    assert not (tmp_path / "runs").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"balancekv {balancekv.__version__}"


@pytest.mark.parametrize("argv", [["demo"], ["reproduce", "fig1"], ["reproduce", "bounds"], ["eval"]])
def test_help_shows_defaults_and_every_option_has_help(argv, capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    out = capsys.readouterr().out
    assert "(default:" in out
    sub = parser
    for name in argv:
        sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    for action in sub._actions:
        assert action.help, f"{argv} {action.option_strings} has no help"
    if argv != ["reproduce", "bounds"]:
        assert "--seed" in out


def test_recorded_command_leaves_out_where_and_progress():
    argv = ["reproduce", "fig1", "--out", "x/y", "--n", "640", "--no-progress", "--out=z", "--text", "a b"]
    assert results.command_line(argv) == "balancekv reproduce fig1 --n 640 --text 'a b'"


def test_run_dir_is_fresh_per_run(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RUNS", tmp_path / "runs")
    a = results.run_dir("eval")
    b = results.run_dir("eval")
    assert a != b and a.is_dir() and b.is_dir()
    assert a.parent == tmp_path / "runs" and a.name.startswith("eval-") and a.name.endswith("Z")
    assert results.run_dir("eval", tmp_path / "given") == tmp_path / "given"


def test_json_is_deterministic():
    import numpy as np

    a = results.dumps({"b": np.float32(0.1), "a": [1.0000000000001, float("inf")], "c": np.int64(3)})
    assert a == '{\n "a": [\n  1.0,\n  Infinity\n ],\n "b": 0.1000000015,\n "c": 3\n}\n'


FIG1 = ["reproduce", "fig1", "--synthetic", "--n", "600", "--layers", "0", "--methods", "uniform", "balance"]


def test_reproduce_default_out_is_a_run_folder_and_reruns_are_byte_identical(tmp_path, monkeypatch, capsys):
    """Default output: runs/reproduce-fig1-<time>/ (not benchmarks/results); two runs with the same
    arguments and seeds write byte-identical files, plots included."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([*FIG1, "--no-progress"]) == 0
    assert cli.main(FIG1) == 0
    a, b = sorted((tmp_path / "runs").iterdir())
    assert a.name.startswith("reproduce-fig1-") and b.name.startswith("reproduce-fig1-")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"fig1_synthetic_n600.md", "fig1_synthetic_n600.json", "fig1_synthetic_n600_kept.png"} <= set(names)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, mismatch
    md = (a / "fig1_synthetic_n600.md").read_text()
    assert "Command: `balancekv reproduce fig1 --synthetic --n 600 --layers 0 --methods uniform balance`" in md
    assert not (tmp_path / "benchmarks").exists()
    capsys.readouterr()
    # --replot redraws the same PNGs from the JSON alone
    before = (a / "fig1_synthetic_n600_bytes.png").read_bytes()
    (a / "fig1_synthetic_n600_bytes.png").unlink()
    assert cli.main(["reproduce", "fig1", "--replot", str(a / "fig1_synthetic_n600.json")]) == 0
    assert (a / "fig1_synthetic_n600_bytes.png").read_bytes() == before


@pytest.mark.slow
@pytest.mark.hf
def test_eval_tiny_end_to_end_and_replot(tmp_path, capsys):
    """``balancekv eval`` at a tiny size on the real SmolLM2: results, report and plot in the given folder;
    ``--replot`` rewrites the report from the JSON alone, identically."""
    from balancekv import models

    try:
        models.check_available("smollm2")
    except ImportError as err:
        pytest.skip(str(err))
    out = tmp_path / "ev"
    argv = ["eval", "--methods", "uniform", "balance", "--keeps", "0.5", "--n-prefix", "128", "--n-cont", "4"]
    argv += ["--lengths", "128", "--depths", "0.5", "--tasks", "nll", "needle", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"eval_prompts.json", "eval_smollm2.json", "eval_smollm2.md", "eval_smollm2.png"} <= names
    md = (out / "eval_smollm2.md").read_text()
    assert "| balance |" in md and "| uniform |" in md
    assert "Command: `balancekv eval --methods uniform balance --keeps 0.5" in md
    png = (out / "eval_smollm2.png").read_bytes()
    capsys.readouterr()
    assert cli.main(["eval", "--replot", str(out)]) == 0
    assert (out / "eval_smollm2.md").read_text() == md
    assert (out / "eval_smollm2.png").read_bytes() == png


def test_kvpress_orchestration_with_a_stand_in_worker(tmp_path, capsys):
    """benchmarks/kvpress_eval.py on a copy of the committed eval results, with a stand-in for the kvpress
    Python that returns the committed kvpress rows: it passes BalanceKV's realised fractions, stores the
    rows, and the report it rewrites equals the committed one."""
    import importlib.util
    import json
    import shutil
    import sys
    from pathlib import Path

    from balancekv import models

    try:
        models.model_dir("smollm2")
    except ImportError as err:
        pytest.skip(str(err))
    root = Path(__file__).resolve().parents[1]
    res = root / "benchmarks" / "results"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("eval_smollm2.json", "eval_prompts.json"):
        shutil.copy(res / name, run / name)
    d = json.loads((run / "eval_smollm2.json").read_text())
    d["kvpress"] = []
    (run / "eval_smollm2.json").write_text(json.dumps(d))
    fake = tmp_path / "fake_python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys, pathlib\n"
        "pathlib.Path(sys.argv[6]).with_name('fractions.json').write_text(sys.argv[7])\n"
        f"shutil.copy({str(res / 'eval_kvpress_raw.json')!r}, sys.argv[6])\n"
    )
    fake.chmod(0o755)
    spec = importlib.util.spec_from_file_location("kvpress_eval", root / "benchmarks" / "kvpress_eval.py")
    kv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv)
    assert kv.main([str(run), "--kvpress-python", str(fake)]) == 0
    fr = json.loads((run / "fractions.json").read_text())
    realised = [r["kept"] for r in d["nll"] if r["method"] == "balance" and r["keep"] == 0.25]
    assert realised and fr["nll"]["0.25"] == pytest.approx(float(np.mean(realised)))
    assert set(fr["needle"]) == {"512", "1024"}
    assert (run / "eval_smollm2.md").read_text() == (res / "eval_smollm2.md").read_text()
    assert len(json.loads((run / "eval_smollm2.json").read_text())["kvpress"]) == len(
        json.loads((res / "eval_kvpress_raw.json").read_text())
    )
    capsys.readouterr()
