"""`nvfp4kit tune [MODEL]`: tune the W4A16 kernels for a model's shapes on this GPU (kept in the tuning cache)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Time the candidate launch configurations of the W4A16 linear and fused-MoE kernels at every shape of a model
on this GPU and keep the fastest in the tuning cache (~/.cache/nvfp4kit/kernels/<card>/triton-<version>.json,
or --cache-dir / $NVFP4KIT_CACHE_DIR). serve, generate, eval and bench use it from then on; without it the kernels use
shape/card heuristics. Random NVFP4 weights of the model's shapes are built on the GPU: nothing is loaded,
so a preset name is enough. Takes a few minutes; --budget-s caps it."""


def register(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "model", nargs="?", default="gemma-4-26b-a4b",
        help="a checkpoint folder or a preset name (default: %(default)s); only its config is read",
    )  # fmt: skip
    p.add_argument(
        "--tokens", type=int, nargs="+", default=None, metavar="M",
        help="token counts to tune (default: 1 2 4 8 16 32 64 128 512 2048)",
    )  # fmt: skip
    p.add_argument(
        "--kernels", nargs="+", choices=("linear", "moe"), default=["linear", "moe"],
        help="which kernels to tune (default: both); e.g. --kernels moe after a change to the MoE kernels",
    )  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, help="stop tuning after this many seconds")
    p.add_argument("--log", action="store_true", help="print every candidate's time")
    p.add_argument(
        "--cache-dir", type=Path, default=None, metavar="DIR",
        help="keep the tables under DIR (default: $NVFP4KIT_CACHE_DIR, else ~/.cache/nvfp4kit/kernels); "
        "pass the same folder to serve / generate --kernel-cache-dir or LLM(kernel_cache_dir=)",
    )  # fmt: skip
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from nvfp4kit.kernels.configs import set_cache_dir
    from nvfp4kit.plan.report import resolve_model
    from nvfp4kit.tuning.autotune import DEFAULT_TOKENS, tune_model

    if args.cache_dir is not None:
        set_cache_dir(args.cache_dir)

    cfg = resolve_model(args.model).cfg
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.log else (lambda msg: None)
    table, path = tune_model(
        cfg,
        tokens=args.tokens or DEFAULT_TOKENS,
        budget_s=args.budget_s,
        log=log,
        kernels=tuple(args.kernels),
    )
    tuned = sum(len(entries) for shapes in table.values() for entries in shapes.values())
    print(f"tuned {tuned} (shape, M) entries; written to {path}")
    return 0
