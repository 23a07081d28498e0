"""The ``balancekv`` command line: ``demo``, ``reproduce …``, ``eval``.

Each subcommand lives in :mod:`balancekv.experiments`; this file only parses
arguments. Register a new subcommand with one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from balancekv.experiments.demo import run_demo  # noqa: PLC0415

    run_demo(keep=args.keep, eps=args.eps, n=args.n, seed=args.seed, source=args.data)


def _add_demo(sub):
    p = sub.add_parser("demo", help="compress a KV cache with every method and print a table")
    p.add_argument("--keep", type=float, default=0.25, help="kept fraction for token-selecting methods")
    p.add_argument("--eps", type=float, default=0.05, help="target error for methods that keep every token")
    p.add_argument("--n", type=int, default=2048, help="tokens in the cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=["auto", "synthetic", "smollm2"], default="auto")
    p.set_defaults(func=_demo)


def _reproduce_fig1(args):
    from balancekv.experiments.fig1 import main as fig1_main  # noqa: PLC0415

    return fig1_main(args)


def _add_reproduce_fig1(rsub):
    from balancekv.experiments.fig1 import DEFAULT_LAYERS, DEFAULT_METHODS  # noqa: PLC0415

    p = rsub.add_parser(
        "fig1", help="[BKV] Fig. 1: single-layer error vs kept rate on SmolLM2 (ends exact, middle compressed)"
    )
    p.add_argument("--n", type=int, default=2048, help="tokens of the text to capture")
    p.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    p.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), help="unregistered ones are skipped with a note"
    )
    p.add_argument("--text", default="python-docs", help="a name from balancekv.texts.TEXTS")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..seeds-1) averaged per point")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"])
    p.add_argument("--synthetic", action="store_true", help="seeded synthetic caches instead of a real model")
    p.add_argument("--out", default="benchmarks/results", help="folder for the markdown table, JSON and plots")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_reproduce_fig1)


def _reproduce_bounds(args):
    from balancekv.experiments.bounds_table import main as bounds_main  # noqa: PLC0415

    return bounds_main(args)


def _add_reproduce_bounds(rsub):
    p = rsub.add_parser("bounds", help="one row per theorem in proofs/: bound, worst observed value, ratio")
    p.add_argument("--seeds", type=int, default=3, help="seeded instances per check")
    p.add_argument("--only", nargs="+", default=None, help="names of the checks to run (default: all)")
    p.add_argument("--out", default="benchmarks/results", help="folder for bounds.md and bounds.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_reproduce_bounds)


#: ``balancekv reproduce <name>`` subcommands, one entry each.
REPRODUCE = [_add_reproduce_fig1, _add_reproduce_bounds]


def _add_reproduce(sub):
    p = sub.add_parser("reproduce", help="reproduce a paper's experiment or the bounds table")
    rsub = p.add_subparsers(dest="experiment", required=True)
    for add in REPRODUCE:
        add(rsub)


def _eval(args):
    from balancekv.experiments.evaluate import run_eval  # noqa: PLC0415

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
        kvpress_python=args.kvpress_python,
        tasks=tuple(args.tasks),
    )


def _add_eval(sub):
    p = sub.add_parser("eval", help="SmolLM2 end to end: NLL and pass-key retrieval from compressed caches")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    p.add_argument("--n-prefix", type=int, default=1024)
    p.add_argument("--n-cont", type=int, default=64)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="pass-key prompt lengths")
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75], help="pass-key depths")
    p.add_argument("--needle-keep", type=float, default=0.25)
    p.add_argument("--tasks", nargs="+", choices=["nll", "needle", "bytes"], default=["nll", "needle", "bytes"])
    p.add_argument("--kvpress-python", default=None, help="python of a separate venv with kvpress installed")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_eval)


COMMANDS = [_add_demo, _add_reproduce, _add_eval]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="balancekv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
