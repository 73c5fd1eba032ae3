"""Correctness of the Triton KV write and attention kernels at 26B-A4B's head shapes, on the GPU.

Sliding layers: 16 query heads over 8 KV heads, head_dim 256, window 1024, ring of window + 2048 slots.
Global layers: 16 query heads over 2 KV heads, head_dim 512, K derived from the stored V (k_eq_v), proportional RoPE.
Decode at contexts up to 128K (several sequences of different lengths in one launch) and an 8K prefill in 2K chunks,
with BF16 and FP8 E4M3 pools. Each output is compared with fp32 math on the same stored values (the truth) and the
engine's bf16 torch reference is compared with the same truth, so the kernel's error is judged against it.

Usage: python scripts/gpu_attention_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_attention_common import (  # noqa: E402
    DEVICE,
    GLOBAL,
    KV_DTYPES,
    SLIDING,
    Pool,
    random_queries,
)

from nvfp4kit.tuning.cases import rel_error  # noqa: E402

BOUND = 1e-2  # relative L2 error against fp32 math; bf16 rounding of the output alone is ~2e-3


def write_step(pool: Pool, i: int, positions: torch.Tensor, gen: torch.Generator) -> bool:
    """This step's K/V rows through the write kernel; True if the stored bytes equal torch's conversion."""
    shape = pool.shape
    k = torch.randn(len(positions), shape.kv_heads, shape.head_dim, device=DEVICE, generator=gen).bfloat16()
    v = torch.randn(len(positions), shape.kv_heads, shape.head_dim, device=DEVICE, generator=gen).bfloat16()
    pool.write(i, positions, k, v)
    slots = pool.slots(i, positions)
    exact = torch.equal(pool.v_store[slots].view(torch.uint8), v.to(pool.dtype).view(torch.uint8))
    if pool.k_store is not None:
        exact &= torch.equal(pool.k_store[slots].view(torch.uint8), k.to(pool.dtype).view(torch.uint8))
    return exact


def check_decode(shape, kv_name: str, contexts: list[int]) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    pool = Pool(shape, KV_DTYPES[kv_name], contexts, seed=2)
    writes_exact = all(
        write_step(pool, i, torch.tensor([c - 1], device=DEVICE), gen) for i, c in enumerate(contexts)
    )
    q = random_queries(shape, len(contexts), gen)
    batch, items = pool.metadata([c - 1 for c in contexts], [1] * len(contexts))
    out = pool.attend(q, batch, items, out=torch.full_like(q, float("nan")))
    rows = []
    for i, c in enumerate(contexts):
        truth = pool.reference(i, q[i : i + 1], c - 1, torch.float32)
        ref = pool.reference(i, q[i : i + 1], c - 1, torch.bfloat16)
        rows.append({
            "context": c,
            "kernel_vs_fp32": rel_error(out[i : i + 1], truth),
            "torch_bf16_vs_fp32": rel_error(ref, truth),
            "kernel_max_abs": float((out[i : i + 1].float() - truth).abs().max()),
        })  # fmt: skip
    return {"case": f"decode {shape.name} {kv_name}", "writes_exact": writes_exact, "rows": rows}


def check_prefill(shape, kv_name: str, total: int = 8192, chunk: int = 2048) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    pool = Pool(shape, KV_DTYPES[kv_name], [total], chunk=chunk, seed=4)
    rows, writes_exact = [], True
    for start in range(0, total, chunk):
        positions = torch.arange(start, start + chunk, device=DEVICE)
        writes_exact &= write_step(pool, 0, positions, gen)
        q = random_queries(shape, chunk, gen)
        batch, items = pool.metadata([start], [chunk])
        out = pool.attend(q, batch, items, out=torch.full_like(q, float("nan")))
        truth = pool.reference(0, q, start, torch.float32)
        ref = pool.reference(0, q, start, torch.bfloat16)
        rows.append({
            "context": start + chunk,
            "kernel_vs_fp32": rel_error(out, truth),
            "torch_bf16_vs_fp32": rel_error(ref, truth),
            "kernel_max_abs": float((out.float() - truth).abs().max()),
        })  # fmt: skip
    return {
        "case": f"prefill {shape.name} {kv_name} ({chunk}-token chunks)",
        "writes_exact": writes_exact,
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth must be fp32
    results = []
    for kv_name in ("bf16", "fp8"):
        results.append(check_decode(SLIDING, kv_name, [77, 1024, 1025, 32768, 131072]))
        results.append(check_decode(GLOBAL, kv_name, [77, 1024, 32768, 131072]))
        results.append(check_prefill(SLIDING, kv_name))
        results.append(check_prefill(GLOBAL, kv_name))
        torch.cuda.empty_cache()
    ok = True
    print(f"{'case':44s} {'ctx':>7s} {'kernel/fp32':>12s} {'torch-bf16/fp32':>16s} {'max abs':>9s}  writes")
    for res in results:
        for row in res["rows"]:
            good = row["kernel_vs_fp32"] < BOUND and res["writes_exact"]
            ok &= good
            print(
                f"{res['case']:44s} {row['context']:7d} {row['kernel_vs_fp32']:12.2e} "
                f"{row['torch_bf16_vs_fp32']:16.2e} {row['kernel_max_abs']:9.2e}  "
                f"{'exact' if res['writes_exact'] else 'DIFFER'} {'ok' if good else 'FAIL'}"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
