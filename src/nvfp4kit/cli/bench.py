"""`nvfp4kit bench SCENARIO ...`: benchmarks; scenarios live in `nvfp4kit.bench` (e.g. `kernels`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from nvfp4kit.bench import register_all

    parser = subparsers.add_parser("bench", help="run a benchmark scenario (see `nvfp4kit bench -h`)")
    scenarios = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    register_all(scenarios)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
