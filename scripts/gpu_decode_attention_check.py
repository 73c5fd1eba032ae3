"""Decode attention alone at serving's batch sizes (64-112 sequences of ~816 tokens, FP8 KV): time, unique KV
bytes a step reads and GB/s against a device copy, with the default tiles and a few others, for a sliding and a
global layer of 26B-A4B. Each launch set is a CUDA graph timed by `triton.testing.do_bench` (L2 flushed), as in
`gpu_attention_bench.py`; every variant's output is compared with the default's. What the engine's profile
attributes to `_paged_attention_kernel` (with PDL it also counts the wait for the kernel before) can be set
against these. Usage (GPU machine, repository root):
  PYTHONPATH=src python3 scripts/gpu_decode_attention_check.py [--batches 64 96 112] [--context 816] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_attention_bench import graph_time_us, kv_read_bytes  # noqa: E402
from gpu_attention_common import DEVICE, GLOBAL, KV_DTYPES, SLIDING, Pool, decode_splits, random_queries  # noqa: E402

from nvfp4kit.kernels.attention_launch import (
    AttentionConfig,
    decode_blocks_per_sm,
    select_config,
    wave_splits,
)  # noqa: E402
from nvfp4kit.tuning.timing import copy_bandwidth_gbps  # noqa: E402

# (block_m, block_n, num_warps, num_stages, max_registers), None: the default; sliding and global layers. Session
# 29 (H100, batch 96 at 816 tokens, us a sliding / global layer): the defaults 196.8 / 151.6 (55% / 18% of the copy
# rate); 16x16 tiles 255.6 (4 warps) and 616.8 (8), 16x32 with 8 warps 393.7; 2 or 4 key splits 201; global 16x32
# 211.6. Session 30: uncapped 144.0 / 188.6 (two global blocks an SM). Session 31: capped at 168 registers (three
# blocks an SM) 146.0 / 121.5; the sliding tile at three stages 129.9, at 128 registers (four blocks) 164.3 at
# batch 96 but 97.3 against 133.6 at batch 64. Non-default tiles run at the split count of their own residency.
VARIANTS = {
    SLIDING: [None, (16, 32, 4, 2, 168), (16, 32, 4, 3, 128), (16, 32, 4, 2, 128)],
    GLOBAL: [None, (16, 32, 4, 2, 168), (16, 16, 4, 3, 168), (16, 16, 4, 2, 128)],
}  # fmt: skip


def decode_inputs(shape, batch: int, context: int, seed: int):
    """(pool, queries, metadata, work items) of one decode step: `batch` sequences of `context` keys each."""
    pool = Pool(shape, KV_DTYPES["fp8"], [context] * batch, seed=seed)
    q = random_queries(shape, batch, torch.Generator(device=DEVICE).manual_seed(0))
    return pool, q, *pool.metadata([context - 1] * batch, [1] * batch)


def keys_read(shape, context: int) -> int:
    """Keys a decode token attends to: the window on sliding layers."""
    return min(context, shape.window) if shape.window else context


def run(shape, batch: int, context: int, tiles, splits: int | None, copy_bw: float, ref=None) -> dict:
    pool, q, meta, items = decode_inputs(shape, batch, context, seed=batch)
    out = torch.empty_like(q)
    splits = splits or decode_splits(shape, batch, keys_read(shape, context), KV_DTYPES["fp8"])
    config = None
    if tiles:
        config = AttentionConfig(*tiles[:2], num_warps=tiles[2], num_stages=tiles[3], max_registers=tiles[4])
        slots = torch.cuda.get_device_properties(0).multi_processor_count * decode_blocks_per_sm(
            config, torch.cuda.get_device_capability()
        )
        group = shape.q_heads // shape.kv_heads
        splits = wave_splits(batch * shape.kv_heads, slots, keys_read(shape, context), group=group, fp8=True)
    us = graph_time_us(lambda: pool.attend(q, meta, items, num_splits=splits, config=config, out=out))
    nbytes = kv_read_bytes(shape, batch, context, 1)
    # the first and last sequences against the fp32 truth over the stored values (bf16 output: ~1e-2 at most)
    truth_err = max(
        (out[i].float() - pool.reference(i, q[i : i + 1], context - 1, torch.float32)[0]).abs().max().item()
        for i in (0, batch - 1)
    )
    default = select_config(
        shape.head_dim, shape.q_heads // shape.kv_heads, decode=True, fp8=True,
        capability=torch.cuda.get_device_capability(),
    )  # fmt: skip
    return {
        "layer": shape.name, "batch": batch, "context": context, "splits": splits,
        "tiles": list(tiles) if tiles else ["default", *default.__dict__.values()],
        "us": us, "kv_mb": nbytes / 1e6, "gbps": nbytes / us / 1e3, "of_copy": nbytes / (us * 1e-6) / copy_bw,
        "truth_err": truth_err, "max_diff": 0.0 if ref is None else (out.float() - ref.float()).abs().max().item(), "out": out,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 96, 112])
    p.add_argument("--context", type=int, default=816)
    p.add_argument("--defaults-only", action="store_true", help="only the default tiles and split count")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--profile-once",
        action="store_true",
        help="launch each layer's default decode once at the first batch size, untimed, for a profiler: "
        "ncu -k regex:_paged_attention --section SpeedOfLight --section WarpStateStats ...",
    )
    args = p.parse_args()
    if args.profile_once:
        for shape in VARIANTS:
            pool, q, meta, items = decode_inputs(shape, args.batches[0], args.context, seed=0)
            pool.attend(q, meta, items)
        torch.cuda.synchronize()
        return
    copy_bw = copy_bandwidth_gbps() * 1e9
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for shape, variants in VARIANTS.items():
        variants = [None] if args.defaults_only else variants
        for batch in args.batches:
            ref = None
            for tiles in variants:
                row = run(shape, batch, args.context, tiles, None, copy_bw, ref)
                ref = row["out"] if ref is None else ref
                rows.append(row)
            # split counts around the engine's choice
            auto = rows[-len(variants)]["splits"]
            others = {1, max(1, auto - 1), auto + 1, auto * 2} - {auto}
            others = set() if args.defaults_only else others
            for splits in sorted(others):
                rows.append(run(shape, batch, args.context, None, splits, copy_bw, ref))
            torch.cuda.empty_cache()
    for r in rows:
        r.pop("out")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_gbps": copy_bw / 1e9, "rows": rows},
                f,
                indent=1,
            )
    print(
        "| layer | batch | tiles (m, n, warps, stages) | splits | us | KV MB | GB/s | of copy | vs truth | vs default |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['batch']} | {r['tiles']} | {r['splits']} | {r['us']:.1f} | {r['kv_mb']:.0f} |"
              f" {r['gbps']:.0f} | {r['of_copy']:.0%} | {r['truth_err']:.1e} | {r['max_diff']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
