"""Prefill GEMM sweep on one GPU (issue 15): dequantize-then-cuBLAS vs Triton tiles vs BF16 cuBLAS.

Dense 26B-A4B linears and the MoE at M = 512, 2048, 4096, 8192: max rel error against fp32 math on the
dequantized weights, median microseconds (triton.testing.do_bench), a compact table last and JSON under --out.
`--chunks C ...` also times the expansion in C row chunks, each expanded into one small reused scratch and
multiplied by cuBLAS straight into its columns of the output: the chunk's BF16 copy may then stay in L2 instead of
making a round trip through DRAM (at M = 1,024 the whole-weight expansion is what separates the linears from
BF16 cuBLAS, 0.77-0.81x on the H200); `overlap{C}` the same with each chunk's expansion on a second stream into
one of two buffers, beside the previous chunk's GEMM. Session 23 (H100): both lose at 1,024 and 2,048 tokens,
1.0-10x the whole-weight expansion's time, the more chunks the slower (docs/benchmarks.md).
Usage: PYTHONPATH=src python3 scripts/gpu_prefill_gemm.py --out DIR [--ms 512 4096] [--skip-moe] [--expand-sweep]
  [--chunks 2 4 8]
"""

# ruff: noqa: B023  (every lambda here is timed and dropped inside its loop iteration)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from nvfp4kit.kernels.configs import LinearConfig, MoEConfig
from nvfp4kit.kernels.dequant import dequantize_nvfp4, scratch_bytes
from nvfp4kit.kernels.fused_moe import fused_moe
from nvfp4kit.kernels.moe_prefill import grouped_mm_available
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.tuning.cases import DENSE_SHAPES, MOE_SHAPE, MoECase, random_nvfp4, rel_error

TRITON_CONFIGS = {
    "t128x128x64s3w8": LinearConfig(
        block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, decode="asm"
    ),
    "t128x256x64s3w8": LinearConfig(
        block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, decode="asm"
    ),
    "t128x128x128s3w8": LinearConfig(
        block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3, decode="asm"
    ),
    # weights as the register operand (swap_ab): the only tiles whose wgmma Triton 3.6 / 3.9 keep asynchronous
    # (at most 3 / 1 groups in flight) for qkv / o / gate_up, so the next K step's decode can overlap the tensor
    # cores; at K = 2,112 (dense down) they wait for every MMA too (session 24, sm_90 SASS on the CPU)
    "s128x128x64s3w8": LinearConfig(
        block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, decode="asm", swap_ab=True
    ),
    "s128x128x64s4w8": LinearConfig(
        block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, decode="asm", swap_ab=True
    ),
    "s256x128x64s3w8": LinearConfig(
        block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3, decode="asm", swap_ab=True
    ),
}
MOE_CONFIGS = {
    "moe64x128": MoEConfig(block_m=64, gate_up_block_n=64, gate_up_block_k=64, down_block_n=128,
                           gate_up_warps=8, down_warps=8, num_stages=3, decode="asm"),
    "moe128x64": MoEConfig(block_m=128, gate_up_block_n=64, gate_up_block_k=64, down_block_n=128,
                           down_block_k=64, gate_up_warps=8, down_warps=8, num_stages=3, decode="asm"),
    "moe128x128s4": MoEConfig(block_m=128, gate_up_block_n=128, gate_up_block_k=64, down_block_n=128,
                              down_block_k=64, gate_up_warps=8, down_warps=8, num_stages=4, decode="asm"),
}  # fmt: skip


def bench_us(fn) -> float:
    return 1000.0 * triton.testing.do_bench(fn, warmup=3, rep=20, return_mode="median")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chunked_linear(x: torch.Tensor, w, chunks: int, buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x @ dequant(w)^T with the weight expanded `chunks` row blocks at a time into `buf`, each multiplied into
    its columns of `out` (a column slice: cuBLAS writes it with the full row stride, no copy)."""
    n, k = w.shape
    rows = triton.cdiv(n, chunks)
    for start in range(0, n, rows):
        count = min(rows, n - start)
        dense = dequantize_nvfp4(w, rows=(start, count), out=buf[: count * k].view(count, k))
        torch.mm(x, dense.t(), out=out[:, start : start + count])
    return out


def overlapped_linear(x, w, chunks: int, bufs, out: torch.Tensor, side: torch.cuda.Stream) -> torch.Tensor:
    """`chunked_linear` with each chunk's expansion on `side`, into one of two buffers, while the main stream
    multiplies the chunk before it: the expansion hides behind the GEMMs except the first chunk's."""
    n, k = w.shape
    rows = triton.cdiv(n, chunks)
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    expanded, multiplied = [], []
    for i, start in enumerate(range(0, n, rows)):
        count = min(rows, n - start)
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(multiplied[i - 2])
            dense = dequantize_nvfp4(w, rows=(start, count), out=bufs[i % 2][: count * k].view(count, k))
            expanded.append(torch.cuda.Event())
            expanded[-1].record(side)
        main.wait_event(expanded[-1])
        torch.mm(x, dense.t(), out=out[:, start : start + count])
        multiplied.append(torch.cuda.Event())
        multiplied[-1].record(main)
    return out


def dense(ms, rows, save, chunk_counts=()) -> None:
    for op, (n, k) in DENSE_SHAPES.items():
        w = random_nvfp4(n, k, seed=1)
        wb = w.dequantize(torch.bfloat16)
        deq_err = float((dequantize_nvfp4(w).float() - wb.float()).abs().max())
        deq_us = bench_us(lambda: dequantize_nvfp4(w, out=torch.empty_like(wb)))
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.dequantize(torch.float32).T
            row = {
                "op": op,
                "N": n,
                "K": k,
                "M": m,
                "dequant_us": round(deq_us, 2),
                "dequant_max_abs": deq_err,
            }
            row["cublas_us"] = bench_us(lambda: F.linear(x, wb))
            row["deq_cublas_us"] = bench_us(lambda: w4a16_linear(x, w, dequant_min_m=1))
            row["deq_cublas_err"] = rel_error(w4a16_linear(x, w, dequant_min_m=1), ref)
            for c in chunk_counts:
                buf = torch.empty(triton.cdiv(n, c) * k, device="cuda", dtype=torch.bfloat16)
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                row[f"chunks{c}_us"] = bench_us(lambda: chunked_linear(x, w, c, buf, out))
                row[f"chunks{c}_err"] = rel_error(chunked_linear(x, w, c, buf, out), ref)
                bufs = (buf, torch.empty_like(buf))
                side = torch.cuda.Stream()
                row[f"overlap{c}_us"] = bench_us(lambda: overlapped_linear(x, w, c, bufs, out, side))
                row[f"overlap{c}_err"] = rel_error(overlapped_linear(x, w, c, bufs, out, side), ref)
            for name, cfg in TRITON_CONFIGS.items():
                try:
                    row[name + "_us"] = bench_us(lambda cfg=cfg: w4a16_linear(x, w, config=cfg))
                    row[name + "_err"] = rel_error(w4a16_linear(x, w, config=cfg), ref)
                except Exception as exc:  # an out-of-resources config is a result, not a crash
                    row[name + "_us"] = None
                    log(f"{op} M={m} {name}: {type(exc).__name__}: {str(exc)[:120]}")
            if m == 2048 and op == "dense_down":
                row["graph_ok"] = graph_check(lambda: w4a16_linear(x, w, dequant_min_m=1))
            rows.append(row)
            log(json.dumps(row))
            save()
        torch.cuda.empty_cache()


def moe(ms, rows, save) -> None:
    e, top_k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
    probe = torch.zeros(1, h, device="cuda", dtype=torch.bfloat16)
    log(f"grouped_mm available: {grouped_mm_available(probe)}")
    for m in ms:
        case = MoECase.build(m, weight_sets=1, route_sets=1, with_bf16=False)
        x, (ids, wts) = case.xs[0], case.routes[0]
        gu, dn = case.gate_up[0], case.down[0]
        row = {"op": "moe", "M": m}
        if m <= 2048:
            ref = TorchBackend().moe(x.float(), ids, wts, gu, dn)
        else:
            ref = None
        buf = torch.empty(e * i * h, device="cuda", dtype=torch.bfloat16)
        row["dequant_all_us"] = bench_us(
            lambda: (
                dequantize_nvfp4(gu, rows=(0, i), out=buf.view(e, i, h)),
                dequantize_nvfp4(gu, rows=(i, i), out=buf.view(e, i, h)),
                dequantize_nvfp4(dn, out=buf.view(e, h, i)),
            )
        )
        variants = {"triton_default": dict(prefill_min_tokens=1 << 30)}
        variants.update({name: dict(config=cfg) for name, cfg in MOE_CONFIGS.items()})
        if grouped_mm_available(x):
            variants["grouped"] = dict(prefill_min_tokens=1)
        for name, kw in variants.items():
            try:
                row[name + "_us"] = bench_us(lambda kw=kw: fused_moe(x, ids, wts, gu, dn, **kw))
                if ref is not None:
                    row[name + "_err"] = rel_error(fused_moe(x, ids, wts, gu, dn, **kw), ref)
            except Exception as exc:
                row[name + "_us"] = None
                log(f"moe M={m} {name}: {type(exc).__name__}: {str(exc)[:200]}")
        if m == 4096 and grouped_mm_available(x):
            row["graph_ok"] = graph_check(lambda: fused_moe(x, ids, wts, gu, dn, prefill_min_tokens=1))
        rows.append(row)
        log(json.dumps(row))
        save()
        torch.cuda.empty_cache()


EXPAND_TILES = [(32, 128, 4), (64, 128, 4), (64, 128, 8), (32, 256, 4), (64, 256, 8), (16, 256, 4), (128, 64, 4),
                (8, 512, 4), (16, 512, 8)]  # fmt: skip


def expand_sweep(rows, save) -> None:
    """Expansion tiles: microseconds and GB/s (packed + scales read, BF16 written) on the largest weights."""
    e, h, i = (MOE_SHAPE[key] for key in ("experts", "hidden", "inter"))
    cases = {
        "dense_qk_global": (random_nvfp4(*DENSE_SHAPES["dense_qk_global"], seed=1), None),
        "dense_down": (random_nvfp4(*DENSE_SHAPES["dense_down"], seed=2), None),
        "moe_gate": (random_nvfp4(2 * i, h, experts=e, seed=3), (0, i)),
        "moe_down": (random_nvfp4(h, i, experts=e, seed=4), None),
    }
    for name, (weight, part) in cases.items():
        ref = dequantize_nvfp4(weight, rows=part)
        moved = ref.numel() * (2 + 0.5 + 1 / 16)
        row = {"op": "expand_" + name, "M": 0, "shape": list(ref.shape)}
        for tile in EXPAND_TILES:
            key = "x".join(map(str, tile))
            out = torch.empty_like(ref)
            try:
                us = bench_us(lambda tile=tile: dequantize_nvfp4(weight, rows=part, out=out, tile=tile))
            except Exception as exc:
                log(f"{name} {key}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            row[key + "_us"] = us
            row[key + "_gbps"] = round(moved / us / 1e3, 1)
            row[key + "_exact"] = bool(torch.equal(out, ref))
        rows.append(row)
        log(json.dumps(row))
        save()


def graph_check(fn) -> bool:
    """The prefill path captures into a CUDA graph and replays to the eager result."""
    eager = fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(out, eager))


def table(rows) -> str:
    lines = []
    for r in rows:
        if r["op"].startswith("expand_"):
            rates = {k[:-5]: v for k, v in r.items() if k.endswith("_gbps")}
            best = max(rates, key=rates.get) if rates else "-"
            parts = " ".join(f"{k}={v:.0f}GB/s" for k, v in rates.items())
            exact = all(v for k, v in r.items() if k.endswith("_exact"))
            lines.append(f"{r['op']:<22} best={best} exact={exact} | {parts}")
            continue
        us = {key[:-3]: val for key, val in r.items() if key.endswith("_us") and val is not None}
        base = us.pop("cublas", None)
        best = min(us.items(), key=lambda kv: kv[1] if kv[0] not in ("dequant", "dequant_all") else 1e30)
        parts = " ".join(f"{key}={val:.1f}" for key, val in us.items())
        ratio = f" ratio_best_vs_cublas={best[1] / base:.2f}" if base else ""
        lines.append(f"{r['op']:<18} M={r['M']:<5} cublas={base or 0:.1f} best={best[0]}{ratio} | {parts}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ms", nargs="+", type=int, default=[512, 2048, 4096, 8192])
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--expand-sweep", action="store_true", help="only time expansion tiles")
    parser.add_argument(
        "--chunks", nargs="+", type=int, default=[], help="also the expansion in C row chunks"
    )
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}

    def save() -> None:
        (out / "prefill_gemm.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))

    start = time.time()
    if args.expand_sweep:
        expand_sweep(rows, save)
        args.skip_dense = args.skip_moe = True
    if not args.skip_dense:
        dense(args.ms, rows, save, args.chunks)
    if not args.skip_moe:
        moe(args.ms, rows, save)
    meta["scratch_bytes"] = scratch_bytes()
    meta["seconds"] = round(time.time() - start, 1)
    save()
    print(table(rows))
    print(f"{meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
