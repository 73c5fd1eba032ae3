"""MoE align (`kernels/moe_align.py`) at decode and prefill sizes: the one-program kernel, the chunked counting
sort and the torch chain, each checked against the torch chain's blocks, timed in CUDA graphs (us per call).
26B-A4B routing: 128 experts, top-8, random router logits. Run on the GPU from the repository root:
  PYTHONPATH=src python3 scripts/gpu_moe_align_bench.py [--tokens 1 16 ...] [--block-m 64] [--json OUT]
  TRITON_INTERPRET=1 PYTHONPATH=src python3 scripts/gpu_moe_align_bench.py --check-cpu   # correctness only
"""

from __future__ import annotations

import argparse
import json

import torch

from nvfp4kit.kernels import moe_align as align
from nvfp4kit.tuning.cases import random_routing
from nvfp4kit.tuning.timing import time_graph

METHODS = {
    "one_program": align._align_triton,
    "experts": align._align_experts,
    "chunked": align._align_chunked,
    "torch": align._align_torch,
}


def blocks_of(ids: torch.Tensor, method, experts: int, bm: int) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """(block_expert, each expert's pairs sorted): inside an expert's run the order may differ between methods."""
    flat = ids.reshape(-1).contiguous()
    n = align.max_blocks(flat.numel(), experts, bm)
    pair_ids = torch.empty(n * bm, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(n, dtype=torch.int32, device=ids.device)
    method(flat, experts, bm, pair_ids, block_expert)
    rows, experts_of = pair_ids.view(n, bm).cpu(), block_expert.cpu()
    per_expert: dict[int, list[int]] = {}
    for row, e in zip(rows, experts_of.tolist()):
        per_expert.setdefault(e, []).extend(row[row < flat.numel()].tolist())
    return experts_of, {e: sorted(p) for e, p in per_expert.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 256, 512, 706, 1536, 2048, 8192]
    )
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--check-cpu", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.check_cpu else "cuda"
    experts, top_k, bm = 128, 8, args.block_m
    rows = []
    for tokens in args.tokens:
        ids, _ = random_routing(tokens, experts, top_k, device=device)
        flat = ids.reshape(-1).contiguous()
        ref = blocks_of(ids, align._align_torch, experts, bm)
        row: dict = {"tokens": tokens, "pairs": flat.numel()}
        n = align.max_blocks(flat.numel(), experts, bm)
        pair_ids = torch.empty(n * bm, dtype=torch.int32, device=device)
        block_expert = torch.empty(n, dtype=torch.int32, device=device)
        for name, method in METHODS.items():
            got = blocks_of(ids, method, experts, bm)
            same = torch.equal(got[0], ref[0]) and got[1] == ref[1]
            row[f"{name}_ok"] = same
            assert same or not args.check_cpu, (tokens, name)
            if args.check_cpu:
                continue
            row[f"{name}_us"] = round(
                time_graph(
                    lambda i, m=method, f=flat, p=pair_ids, b=block_expert: m(f, experts, bm, p, b), sets=1
                ),
                2,
            )
        rows.append(row)
        if args.check_cpu:
            print(tokens, "tokens: every method gives the torch chain's blocks")
            continue
        print(
            f"{tokens:6d} tokens  "
            + "  ".join(
                f"{k[:-3]} {row[k]:8.2f} us{'' if row[k[:-3] + '_ok'] else ' WRONG'}"
                for k in row
                if k.endswith("_us")
            ),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "block_m": bm, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
