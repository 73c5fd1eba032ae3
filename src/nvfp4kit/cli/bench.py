"""`nvfp4kit bench SCENARIO ...`: benchmarks; scenarios live in `nvfp4kit.bench` (e.g. `kernels`)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from nvfp4kit.bench import register_all

    scenarios = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    register_all(scenarios)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
