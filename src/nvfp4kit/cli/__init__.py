"""The `nvfp4kit` command line.

`COMMANDS` names each subcommand, the module that defines it and its one-line help. A module is imported only
when its command runs (or its help is asked for): `nvfp4kit --help` and `nvfp4kit plan` never import torch, and
no command's parser imports triton. A command module defines `register(parser)`, which adds its arguments and
sets `func` (via `set_defaults`) to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable, Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "quantize": ("quantize", "quantize a BF16 Gemma 4 checkpoint to NVFP4 (ModelOpt format)"),
    "plan": ("plan", "what fits on a GPU: weights, KV pools, context, concurrency, decode roofline"),
    "serve": ("serve", "serve a model over an OpenAI-compatible HTTP API"),
    "generate": ("generate", "generate text from a prompt or a chat message"),
    "tune": ("tune", "tune the W4A16 kernels for a model's shapes on this GPU (kept in the tuning cache)"),
    "bench": ("bench", "run a benchmark scenario (see `nvfp4kit bench -h`)"),
    "eval": ("eval", "compare a quantized checkpoint with its reference (KL divergence, top-1, perplexity)"),
    "inspect": ("inspect", "describe a checkpoint without loading it"),
    "make-tiny": ("make_tiny", "write a tiny random Gemma 4 checkpoint"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the full arguments of `commands` (default: all); the others are listed by name only."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="nvfp4kit",
        description="Quantize, plan and run fully NVFP4 Gemma 4 models (W4A16 on SM80+ GPUs, or on CPU).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        if name in wanted:
            importlib.import_module(f"{__name__}.{module}").register(command_parser)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv: the first word that is one (global options may come before it)."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = command_in(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
