"""`nvfp4kit make-tiny`: write a tiny random Gemma 4 checkpoint (for tests, demos and bug reports)."""

from __future__ import annotations

import argparse


def register(p: argparse.ArgumentParser) -> None:
    from nvfp4kit.testing.tiny_config import SHAPES

    p.description = "Write a tiny random Gemma 4 checkpoint with a Gemma 4 tokenizer and chat template."
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="moe", help="moe (26B-A4B-like), dense (31B-like), e2b"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--multimodal", action="store_true", help="write the gemma4 (multimodal) config form")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from nvfp4kit.testing.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(
        args.out,
        shape=args.shape,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        multimodal=args.multimodal,
    )
    print(f"wrote {folder}")
    return 0
