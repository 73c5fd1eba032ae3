"""Run the batch-1 decode kernels of the 26B-A4B shape a few times each, for a profiler to look inside them.

Usage (GPU machine, repository root), e.g. with Nsight Compute:
  ncu --launch-skip 3 --launch-count 1 -k regex:moe_gate_up_split --section SpeedOfLight --section Occupancy \
      --section WarpStateStats python3 scripts/gpu_ncu_decode_kernels.py
Launches, in order, 4 times each: the MoE layer at M=1 (split mode: gate_up, down), the dense qkv linear of a
sliding layer at M=1 and the o linear, with the configurations the engine would pick on this card.
"""

from __future__ import annotations

import torch

from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, MoECase, random_nvfp4

moe = MoECase.build(1, weight_sets=1, route_sets=1, with_bf16=False)
run_moe = moe.call(None)
linears = {op: random_nvfp4(*DENSE_SHAPES[op]) for op in ("dense_qkv_sliding", "dense_o_sliding")}
for _ in range(4):
    run_moe(0)
for w in linears.values():
    x = torch.randn(1, w.shape[1], device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        w4a16_linear(x, w)
torch.cuda.synchronize()
print("done")
