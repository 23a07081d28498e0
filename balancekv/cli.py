"""The ``balancekv`` command line: ``demo``, ``reproduce …``, ``eval``.

Each subcommand lives in :mod:`balancekv.experiments`; this file only parses
and checks arguments (a bad value is a usage error, exit status 2, before any
model loads). Register a new subcommand with one entry in ``COMMANDS``.

``reproduce …`` and ``eval`` write into a fresh ``runs/<command>-<UTC time>/``
unless ``--out`` names a folder (``--out benchmarks/results`` updates the
committed results); see :mod:`balancekv.experiments.results`.
"""

from __future__ import annotations

import argparse
import math
import sys

from balancekv import __version__

OUT_HELP = (
    "folder for the results (default: a new runs/<command>-<UTC time>/; benchmarks/results updates the committed ones)"
)


# ---------------------------------------------------------------------- argument types (usage errors, exit 2)
def _number(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return x


def fraction(s: str) -> float:
    """A kept fraction in (0, 1]."""
    x = _number(s)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {s}")
    return x


def open_unit(s: str) -> float:
    """A target error in (0, 1)."""
    x = _number(s)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {s}")
    return x


def unit(s: str) -> float:
    """A depth in [0, 1]."""
    x = _number(s)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {s}")
    return x


def int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            x = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {s}")
        return x

    parse.__name__ = f"integer >= {lo}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (``(default: …)``), except where there is none to show."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == argparse.SUPPRESS or not action.option_strings:
            return action.help
        shown = " ".join(str(x) for x in d) if isinstance(d, (list, tuple)) else str(d)
        return f"{action.help} (default: {shown})"


def _parser(sub, name: str, **kw):
    return sub.add_parser(name, formatter_class=_Formatter, **kw)


# ---------------------------------------------------------------------- demo
#: Fewest tokens the demo runs on: 64 observed + 64 scored query positions (real data), and every
#: method's fixed parts (sink 32 + window 32 + a middle) on synthetic data.
DEMO_MIN_N = 128


def _demo(args):
    from balancekv.experiments.demo import run_demo  # noqa: PLC0415

    run_demo(keep=args.keep, eps=args.eps, n=args.n, seed=args.seed, source=args.data)


def _add_demo(sub):
    p = _parser(sub, "demo", help="compress a KV cache with every method and print a table")
    p.add_argument("--keep", type=fraction, default=0.25, help="kept fraction for token-selecting methods, in (0, 1]")
    p.add_argument(
        "--eps", type=open_unit, default=0.05, help="target error, in (0, 1), for methods that keep every token"
    )
    p.add_argument("--n", type=int_at_least(DEMO_MIN_N), default=2048, help="tokens in the cache")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the synthetic data and the compressors")
    p.add_argument(
        "--data",
        choices=["auto", "synthetic", "smollm2"],
        default="auto",
        help="auto: a SmolLM2 layer when the hf extra is installed, else synthetic",
    )
    p.set_defaults(func=_demo, check=_check_demo, parser=p)


def _check_demo(args):
    if args.data in ("auto", "smollm2"):
        from balancekv.models import get_spec  # noqa: PLC0415

        top = get_spec("smollm2").max_tokens
        if args.n > top:
            args.parser.error(
                f"argument --n: the SmolLM2 layer of --data {args.data} takes at most {top} tokens, got {args.n} "
                "(--data synthetic takes any n)"
            )


# ---------------------------------------------------------------------- reproduce fig1
def _fig1_config(args):
    from balancekv.experiments.fig1 import Fig1Config  # noqa: PLC0415

    return Fig1Config(
        n=args.n,
        layers=tuple(args.layers),
        methods=tuple(args.methods),
        text=args.text,
        seeds=args.seeds,
        model=args.model,
    )


def _check_replot(args, what: str) -> None:
    """``--replot`` names something a run wrote: a missing one is a usage error (it was a traceback, exit 1)."""
    from pathlib import Path  # noqa: PLC0415

    path = Path(args.replot)
    target = path / what if what else path
    if not target.is_file():
        args.parser.error(f"argument --replot: {str(target)!r} does not exist (give what a run wrote)")


def _check_fig1(args):
    if args.replot:
        _check_replot(args, "")
        return
    try:
        _fig1_config(args).validate()
    except (TypeError, ValueError) as err:
        args.parser.error(str(err))
    given = {a.split("=", 1)[0] for a in getattr(args, "argv", [])}
    ignored = sorted(given & {"--text", "--model"})
    if args.synthetic and ignored:  # they choose a real model's capture (--layers seeds the synthetic caches)
        args.parser.error(f"argument --synthetic: {', '.join(ignored)} choose a real model's cache and do not apply")
    if not args.synthetic:
        from balancekv.models import get_spec  # noqa: PLC0415
        from balancekv.texts import TEXTS  # noqa: PLC0415

        if args.text not in TEXTS and len(args.text.encode()) < args.n:
            # taken as the text itself: a byte-level BPE token covers at least one byte, so it has < n tokens
            args.parser.error(
                f"argument --text: {args.text[:40]!r} is not one of the texts ({', '.join(TEXTS)}), and as the "
                f"text itself it is shorter than --n {args.n} tokens"
            )

        spec = get_spec(args.model)
        bad = [L for L in args.layers if L >= spec.n_layers]
        if bad:
            args.parser.error(f"argument --layers: {args.model} has layers 0..{spec.n_layers - 1}, got {bad}")
        if args.n > spec.max_tokens:
            args.parser.error(f"argument --n: {args.model} takes at most {spec.max_tokens} tokens, got {args.n}")


def _reproduce_fig1(args):
    from balancekv.experiments.fig1 import main as fig1_main  # noqa: PLC0415

    return fig1_main(args)


def _add_reproduce_fig1(rsub):
    from balancekv.experiments.fig1 import DEFAULT_LAYERS, DEFAULT_METHODS  # noqa: PLC0415
    from balancekv.texts import TEXTS  # noqa: PLC0415

    p = _parser(
        rsub, "fig1", help="[BKV] Fig. 1: single-layer error vs kept rate on SmolLM2 (ends exact, middle compressed)"
    )
    p.add_argument(
        "--n", type=positive_int, default=2048, help="tokens of the cache (more than the 512 exact head and tail)"
    )
    p.add_argument("--layers", type=nonnegative_int, nargs="+", default=list(DEFAULT_LAYERS), help="layer indices")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="names or name:key=value,... configurations (an unknown name or option is a usage error)",
    )
    p.add_argument(
        "--text", default="python-docs", help=f"a text of balancekv.texts ({', '.join(TEXTS)}) or the text itself"
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="number of seeds (0..seeds-1) averaged per point")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"], help="model whose caches are captured")
    p.add_argument("--synthetic", action="store_true", help="seeded synthetic caches instead of a real model")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--replot",
        metavar="JSON",
        default=None,
        help="only redraw the PNGs from a results JSON a run wrote (no experiment is run)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_reproduce_fig1, check=_check_fig1, parser=p, run_name="reproduce-fig1")


# ---------------------------------------------------------------------- reproduce bounds
def _check_name(s: str) -> str:
    from balancekv.experiments.bounds_table import CHECKS  # noqa: PLC0415

    names = [c.name for c in CHECKS]
    if s not in names:
        raise argparse.ArgumentTypeError(f"unknown check {s!r}; available: {', '.join(repr(n) for n in names)}")
    return s


def _reproduce_bounds(args):
    from balancekv.experiments.bounds_table import main as bounds_main  # noqa: PLC0415

    return bounds_main(args)


def _add_reproduce_bounds(rsub):
    p = _parser(rsub, "bounds", help="one row per theorem in proofs/: bound, worst observed value, ratio")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeded instances per check")
    p.add_argument(
        "--only", nargs="+", type=_check_name, default=None, help="names of the checks to run (default: all)"
    )
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_reproduce_bounds, parser=p, run_name="reproduce-bounds")


#: ``balancekv reproduce <name>`` subcommands, one entry each.
REPRODUCE = [_add_reproduce_fig1, _add_reproduce_bounds]


def _add_reproduce(sub):
    p = _parser(sub, "reproduce", help="reproduce a paper's experiment or the bounds table")
    rsub = p.add_subparsers(dest="experiment", required=True)
    for add in REPRODUCE:
        add(rsub)


# ---------------------------------------------------------------------- eval
def _eval_method(s: str) -> str:
    from balancekv import available_methods  # noqa: PLC0415

    names = [m for m in available_methods() if m != "exact"]
    if s not in names:
        raise argparse.ArgumentTypeError(f"unknown method {s!r}; available: {', '.join(names)}")
    return s


def _eval(args):
    from balancekv.experiments.evaluate import run_eval  # noqa: PLC0415

    if args.replot:
        from balancekv.experiments.eval_report import write_report  # noqa: PLC0415

        print(write_report(args.replot))
        return 0
    run_eval(
        methods=args.methods,
        keeps=tuple(args.keeps),
        n_prefix=args.n_prefix,
        n_cont=args.n_cont,
        samples=args.samples,
        lengths=tuple(args.lengths),
        depths=tuple(args.depths),
        needle_keep=args.needle_keep,
        out_dir=args.out,
        seed=args.seed,
        tasks=tuple(args.tasks),
        progress=not args.no_progress,
        command=args.recorded,
    )
    return 0


def _add_eval(sub):
    p = _parser(sub, "eval", help="SmolLM2 end to end: NLL and pass-key retrieval from compressed caches")
    p.add_argument("--methods", nargs="+", type=_eval_method, default=None, help="default: every registered method")
    p.add_argument("--keeps", type=fraction, nargs="+", default=[0.5, 0.25, 0.125], help="nominal kept fractions")
    p.add_argument("--n-prefix", type=int_at_least(128), default=1024, help="prompt tokens per NLL window")
    p.add_argument("--n-cont", type=int_at_least(2), default=64, help="continuation tokens per NLL window")
    p.add_argument("--samples", type=positive_int, default=1, help="NLL windows (consecutive pieces of the text)")
    p.add_argument("--lengths", type=int_at_least(128), nargs="+", default=[512, 1024], help="pass-key prompt lengths")
    p.add_argument("--depths", type=unit, nargs="+", default=[0.25, 0.75], help="pass-key depths in [0, 1]")
    p.add_argument("--needle-keep", type=fraction, default=0.25, help="nominal kept fraction for pass-key prompts")
    p.add_argument(
        "--tasks", nargs="+", choices=["nll", "needle", "bytes"], default=["nll", "needle", "bytes"], help="what to run"
    )
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument(
        "--replot",
        metavar="DIR",
        default=None,
        help="only rewrite eval_smollm2.md and .png from the eval_smollm2.json in DIR (no model runs)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the pass keys and the compressors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval, check=_check_eval, parser=p, run_name="eval")


def _check_eval(args):
    if args.replot:
        from balancekv.experiments.eval_report import RESULTS  # noqa: PLC0415

        _check_replot(args, RESULTS)


COMMANDS = [_add_demo, _add_reproduce, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancekv",
        description="KV-cache compression with provable error bounds: demo, paper reproductions, evaluation.",
        epilog="reproduce and eval write into a new runs/<command>-<UTC time>/ unless --out names a folder. "
        "A bad value is a usage error (exit status 2). Help of a command: balancekv <command> --help.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"balancekv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "check", None):
        args.check(args)  # cross-argument checks: a usage error before anything is written
    if hasattr(args, "out") and not getattr(args, "replot", None):
        from balancekv.experiments.results import command_line, recorded_argv, run_dir  # noqa: PLC0415

        # what the experiment modules record: the command without --out / --no-progress
        args.argv = recorded_argv(argv)
        args.recorded = command_line(argv)
        try:
            args.out = str(run_dir(args.run_name, args.out))
        except OSError as err:  # a folder that cannot be made: a usage error, not a traceback
            args.parser.error(f"argument --out: cannot write to {args.out or 'runs/'!r}: {err.strerror or err}")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
