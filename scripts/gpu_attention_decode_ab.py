"""`nvfp4kit bench engine` with other decode-attention tiles for the layers that store K (the sliding layers of
26B-A4B): the bench's own arguments after `--`, one bench run per tile set in one process (each builds its model;
`--json F` writes F.0.json, F.1.json, ...). Usage (GPU machine, repository root):
  PYTHONPATH=src python3 scripts/gpu_attention_decode_ab.py --tiles default 16,16,4,2 default --json OUT/ab -- \\
      --decode-batches 64 96 112 --context 816 --kv-dtype fp8_e4m3 --max-model-len 16384 --baseline none
A tile set is block_m,block_n,num_warps,num_stages, or `default` (`select_config`'s).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from nvfp4kit.cli import main as cli_main
from nvfp4kit.kernels import paged_attention
from nvfp4kit.kernels.attention_launch import AttentionConfig

ORIGINAL_SELECT = paged_attention.select_config


def patched_select(tiles: AttentionConfig | None):
    """`select_config` with `tiles` for decode over pools that store K (head dim < 512 in 26B-A4B)."""

    def select(head_dim, group, *, decode, fp8=False, capability=None):
        cfg = ORIGINAL_SELECT(head_dim, group, decode=decode, fp8=fp8, capability=capability)
        return cfg if tiles is None or not decode or head_dim >= 512 else replace(tiles)

    return select


def parse_tiles(text: str) -> AttentionConfig | None:
    if text == "default":
        return None
    m, n, warps, stages = (int(v) for v in text.split(","))
    return AttentionConfig(m, n, num_warps=warps, num_stages=stages)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", nargs="+", default=["default", "16,16,4,2"])
    p.add_argument("--json", help="write each run's rows to JSON.<i>.json")
    args = p.parse_args(argv[:split])
    bench = argv[split + 1 :]
    for i, text in enumerate(args.tiles):
        paged_attention.select_config = patched_select(parse_tiles(text))
        print(f"== decode attention tiles: {text}", flush=True)
        cli_main(["bench", "engine", *bench, *(["--json", f"{args.json}.{i}.json"] if args.json else [])])


if __name__ == "__main__":
    main()
