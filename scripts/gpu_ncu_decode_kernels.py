"""Run the 26B-A4B MoE layer and two dense linears a few times each, for a profiler to look inside them.

Usage (GPU machine, repository root), e.g. with Nsight Compute:
  ncu --launch-skip 3 --launch-count 1 -k regex:moe_gate_up_split --section SpeedOfLight --section Occupancy \
      --section WarpStateStats python3 scripts/gpu_ncu_decode_kernels.py [--tokens 1]
Launches, in order, 4 times each: the MoE layer at --tokens tokens (at 1 token split mode: gate_up, down; at
prefill sizes the sorted kernels: align, gate_up, down, sum), then, at --linear-tokens tokens (default 1), the
dense qkv linear of a sliding layer and the o linear; all with the configurations the engine would pick on this
card (at 64 tokens the linears are `_w4a16_dot_kernel`'s tiles: 2.4 ms of a batch-64 step at ~11% of the
bandwidth on the H100, session 22). `--grouped`: the
MoE launches are `moe_frag_grouped`'s (align, gate_up, down, sum) instead.
"""

from __future__ import annotations

import argparse

import torch

from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, MoECase, random_nvfp4

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=1, help="tokens of the MoE launches")
ap.add_argument("--no-linears", action="store_true", help="only the MoE layer")
ap.add_argument("--linear-tokens", type=int, default=1, help="tokens of the dense linears' launches")
ap.add_argument(
    "--grouped", action="store_true", help="the expert-grouped fragment MoE instead of the engine's"
)
args = ap.parse_args()
moe = MoECase.build(args.tokens, weight_sets=1, route_sets=1, with_bf16=False)
run_moe = moe.call(None)
if args.grouped:
    from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped

    def run_moe(i: int):
        ids, weights = moe.routes[0]
        return fused_moe_grouped(moe.xs[0], ids, weights, moe.gate_up[0], moe.down[0])


for _ in range(4):
    run_moe(0)
if not args.no_linears:
    for op in ("dense_qkv_sliding", "dense_o_sliding"):
        w = random_nvfp4(*DENSE_SHAPES[op])
        x = torch.randn(args.linear_tokens, w.shape[1], device="cuda", dtype=torch.bfloat16)
        for _ in range(4):
            w4a16_linear(x, w)
torch.cuda.synchronize()
print("done")
