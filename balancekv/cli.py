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


COMMANDS = [_add_demo]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="balancekv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
