"""The output projection of Gemma 4 (262,144 x 2,816): BF16 cuBLAS against the FP8 W8A16 kernel, decode M.

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_lm_head.py
Checks the kernel against the dequantized matmul, then times both in CUDA graphs; prints GB/s on the bytes read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvfp4kit.formats.fp8_rows import quantize_fp8_rows
from nvfp4kit.kernels.w8a16_linear import w8a16_linear
from nvfp4kit.tuning.timing import copy_bandwidth_gbps, time_graph

n, k = 262144, 2816
head = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
fp8 = quantize_fp8_rows(head)
copy = copy_bandwidth_gbps()
print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s")
print(f"{'M':>3} {'bf16 us':>9} {'GB/s':>6} {'fp8 us':>9} {'GB/s':>6} {'rel err vs dequant':>18}")
for m in (1, 2, 4, 8, 16, 64):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ fp8.dequantize().T
    err = float((w8a16_linear(x, fp8).float() - ref).norm() / ref.norm())
    bf16_us = time_graph(lambda i, x=x: F.linear(x, head), sets=1, calls=10, repeats=7)
    fp8_us = time_graph(lambda i, x=x: w8a16_linear(x, fp8), sets=1, calls=10, repeats=7)
    print(
        f"{m:3} {bf16_us:9.1f} {2 * n * k / bf16_us / 1e3:6.0f} {fp8_us:9.1f} {n * k / fp8_us / 1e3:6.0f} {err:18.1e}"
    )
