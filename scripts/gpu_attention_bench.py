"""Timings of the Triton attention kernels at 26B-A4B's head shapes on the GPU.

Decode (one query token per sequence) at batch 1, 16, 64 and contexts 1K, 32K, 128K, for a sliding layer (ring,
window 1024: at most 1024 keys read) and a global layer (paged, K derived from the stored V), BF16 and FP8 pools.
Each launch set (attention + split merge) is captured in a CUDA graph and timed by its replays with
`triton.testing.do_bench` (median; it flushes L2 before each replay). KV bytes are the unique bytes a step must read
(K and V of the window for sliding layers, V of the whole context for global layers); GB/s is compared with a
device-to-device copy measured in the same run. A contiguous-cache torch SDPA decode (bf16) is the library baseline.
Also: the KV write at batch 64 and for a 2K chunk, and prefill of the last 2K chunk of an 8K prompt.

Usage: python scripts/gpu_attention_bench.py [--out results.json] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_attention_common import (  # noqa: E402
    DEVICE,
    GLOBAL,
    KV_DTYPES,
    SLIDING,
    Pool,
    decode_splits,
    random_queries,
)

from nvfp4kit.kernels.attention_launch import AttentionConfig, select_config  # noqa: E402
from nvfp4kit.tuning.timing import copy_bandwidth_gbps  # noqa: E402


def graph_time_us(fn) -> float:
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=20, rep=100, return_mode="median")


def kv_read_bytes(shape, batch: int, context: int, elem: int) -> int:
    keys = min(context, shape.window) if shape.window else context
    tensors = 1 if shape.derived else 2
    return batch * keys * shape.kv_heads * shape.head_dim * elem * tensors


def decode_case(shape, kv_name, batch, context, copy_bw, *, num_splits=None, config=None) -> dict:
    pool = Pool(shape, KV_DTYPES[kv_name], [context] * batch, seed=batch)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = random_queries(shape, batch, gen)
    meta, items = pool.metadata([context - 1] * batch, [1] * batch)
    out = torch.empty_like(q)
    keys = context if shape.window is None else min(context, shape.window)
    splits = num_splits or decode_splits(shape, batch, keys, KV_DTYPES[kv_name])
    us = graph_time_us(lambda: pool.attend(q, meta, items, num_splits=splits, config=config, out=out))
    nbytes = kv_read_bytes(shape, batch, context, pool.v_store.element_size())
    return {
        "layer": shape.name, "kv": kv_name, "batch": batch, "context": context, "splits": splits,
        "config": (config or select_config(shape.head_dim, shape.q_heads // shape.kv_heads, decode=True)).__dict__,
        "us": us, "kv_bytes": nbytes, "gbps": nbytes / us / 1e3, "of_copy": nbytes / (us * 1e-6) / copy_bw,
    }  # fmt: skip


def sdpa_case(shape, batch, context) -> dict | None:
    """torch SDPA over a contiguous bf16 cache of the keys the step reads (no paging, K stored)."""
    keys = min(context, shape.window) if shape.window else context
    if batch * keys * shape.kv_heads * shape.head_dim * 2 * 2 > 8 << 30:
        return None
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, shape.q_heads, 1, shape.head_dim, device=DEVICE, generator=gen).bfloat16()
    k = torch.randn(batch, shape.kv_heads, keys, shape.head_dim, device=DEVICE, generator=gen).bfloat16()
    v = torch.randn_like(k)
    try:
        us = graph_time_us(lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True))
    except RuntimeError as err:
        return {"layer": shape.name, "batch": batch, "context": context, "error": str(err)[:120]}
    nbytes = 2 * k.numel() * 2
    return {"layer": shape.name, "batch": batch, "context": context, "us": us, "gbps": nbytes / us / 1e3}


def prefill_case(shape, kv_name, total=8192, chunk=2048, config=None) -> dict:
    pool = Pool(shape, KV_DTYPES[kv_name], [total], chunk=chunk, seed=5)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = random_queries(shape, chunk, gen)
    start = total - chunk
    block_q = config.block_m // (shape.q_heads // shape.kv_heads) if config else None
    meta, items = pool.metadata([start], [chunk], block_q=block_q)
    out = torch.empty_like(q)
    us = graph_time_us(lambda: pool.attend(q, meta, items, out=out, config=config))
    # multiply-adds of QK^T and PV over the keys each query may see (causal, windowed)
    visible = sum(min(p + 1, shape.window) if shape.window else p + 1 for p in range(start, total))
    flops = 4 * visible * shape.q_heads * shape.head_dim
    positions = torch.arange(start, total, device=DEVICE)
    k = torch.randn(chunk, shape.kv_heads, shape.head_dim, device=DEVICE, generator=gen).bfloat16()
    write_us = graph_time_us(lambda: pool.write(0, positions, k, k))
    cfg = config or select_config(shape.head_dim, shape.q_heads // shape.kv_heads, decode=False)
    return {"layer": shape.name, "kv": kv_name, "context": total, "chunk": chunk, "us": us,
            "tflops": flops / us / 1e6, "write_us": write_us, "config": cfg.__dict__}  # fmt: skip


def sweep(copy_bw) -> list[dict]:
    """Tile sizes and split counts around the defaults (decode), and prefill tiles."""
    rows = []
    decode_tiles = {
        SLIDING: [(16, 32, 8, 2), (16, 32, 8, 3), (16, 32, 4, 2), (16, 64, 8, 2)],
        GLOBAL: [(16, 32, 8, 2), (16, 32, 8, 3), (16, 16, 8, 2), (16, 16, 4, 2)],
    }
    for shape, tiles in decode_tiles.items():
        batch = 64 if shape.window else 16
        for kv in ("bf16", "fp8"):
            for m, n, w, st in tiles:
                cfg = AttentionConfig(m, n, num_warps=w, num_stages=st)
                rows.append(decode_case(shape, kv, batch, 32768, copy_bw, config=cfg))
    for kv in ("bf16", "fp8"):
        for batch, context in ((1, 131072), (16, 32768)):
            auto = decode_splits(GLOBAL, batch, context, KV_DTYPES[kv])
            for splits in sorted({max(1, auto // 2), auto, auto * 2}):
                rows.append(decode_case(GLOBAL, kv, batch, context, copy_bw, num_splits=splits))
    prefill_tiles = {
        SLIDING: [(64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 4, 2)],
        GLOBAL: [(32, 32, 8, 2), (32, 32, 8, 3), (16, 32, 8, 2)],
    }
    for shape, tiles in prefill_tiles.items():
        for m, n, w, st in tiles:
            row = prefill_case(shape, "fp8", config=AttentionConfig(m, n, num_warps=w, num_stages=st))
            rows.append({**row, "batch": 1, "splits": 1, "gbps": 0.0})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(DEVICE)
    copy_bw = copy_bandwidth_gbps() * 1e9  # bytes/s
    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    result = {"device": props.name, "copy_gbps": copy_bw / 1e9, "decode": [], "sdpa": [], "prefill": []}
    if args.sweep:
        result["sweep"] = sweep(copy_bw)
        for r in result["sweep"]:
            print(f"sweep {r['layer']:7s} {r['kv']:4s} b{r['batch']:<3d} {r['context']:6d} splits {r['splits']:3d} "
                  f"{tuple(r['config'].values())} {r['us']:9.1f} us {r['gbps']:6.0f} GB/s {r.get('tflops', 0):5.1f} TF")  # fmt: skip
    for shape in (SLIDING, GLOBAL):
        for kv in ("fp8", "bf16"):
            for batch in (1, 16, 64):
                for context in (1024, 32768, 131072):
                    result["decode"].append(decode_case(shape, kv, batch, context, copy_bw))
                    torch.cuda.empty_cache()
        for batch in (1, 16, 64):
            for context in (1024, 32768, 131072):
                row = sdpa_case(shape, batch, context)
                if row:
                    result["sdpa"].append(row)
        for kv in ("fp8", "bf16"):
            result["prefill"].append(prefill_case(shape, kv))
    print(f"{'layer':8s} {'kv':4s} {'batch':>5s} {'context':>7s} {'splits':>6s} {'us':>9s} {'MB read':>8s} "
          f"{'GB/s':>6s} {'of copy':>7s}")  # fmt: skip
    for r in result["decode"]:
        print(f"{r['layer']:8s} {r['kv']:4s} {r['batch']:5d} {r['context']:7d} {r['splits']:6d} {r['us']:9.1f} "
              f"{r['kv_bytes'] / 1e6:8.1f} {r['gbps']:6.0f} {r['of_copy']:7.0%}")  # fmt: skip
    for r in result["sdpa"]:
        print("sdpa", r)
    for r in result["prefill"]:
        print("prefill", r)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
