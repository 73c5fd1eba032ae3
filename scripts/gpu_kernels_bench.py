"""Run `nvfp4kit bench kernels ...` without importing the whole CLI (the device image lacks the serve deps).

Usage on the GPU machine, from the repository root:
    PYTHONPATH=src python3 scripts/gpu_kernels_bench.py kernels --tune --json $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import sys

from nvfp4kit.bench import register_all


def main() -> int:
    parser = argparse.ArgumentParser(prog="nvfp4kit bench")
    register_all(parser.add_subparsers(dest="scenario", required=True))
    args = parser.parse_args()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
