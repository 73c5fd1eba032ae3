"""Prefill-sized NVFP4 MoE: experts expanded into a BF16 scratch, grouped GEMMs over expert-sorted tokens.

out[t] = sum_k w[t, k] * down_e(gelu_tanh(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, k].

Pairs (token, slot) are sorted by expert (a stable sort on the device) and their rows gathered once; each
projection is one `torch._grouped_mm` (CUTLASS grouped GEMM on SM90) over all experts, with the expert's rows
given by device-side cumulative counts. The scratch holds one [E, I, H] block of BF16 weights (gate, then up,
then down reuse it), so the three grouped GEMMs never need all 3*E*I*H expanded values at once. A last kernel
un-sorts, weights and sums each token's top-k rows in fp32. No host syncs: the op is capturable.

Used by `fused_moe` for many tokens where grouped GEMMs exist (SM90 CUDA, the CPU); elsewhere (Ampere) the
Triton grouped kernels of `fused_moe.py` run at every size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import device_capability
from nvfp4kit.kernels.dequant import dequantize_nvfp4, scratch
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs


def grouped_mm_available(x: torch.Tensor) -> bool:
    """True where `torch._grouped_mm` runs this dtype at speed: the CPU (tests), and BF16 on SM90+ CUDA."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.bfloat16, torch.float32)
    return x.is_cuda and x.dtype == torch.bfloat16 and device_capability(x.device) >= (9, 0)


@triton.jit
def _unsort_sum_kernel(
    y_ptr,
    pos_ptr,
    route_ptr,
    out_ptr,
    hidden,
    stride_y,
    stride_o,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[t] = sum_k route[t*K+k] * y[pos[t*K+k]] in fp32: y rows are in expert order, pos maps pair -> row."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        row = tl.load(pos_ptr + pair).to(tl.int64)
        w = tl.load(route_ptr + pair).to(tl.float32)
        acc += w * tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _grouped(a: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [P, K] (rows sorted by expert) x weights [E, N, K] -> [P, N]; expert e owns rows [offs[e-1], offs[e])."""
    return torch._grouped_mm(a, weights.transpose(1, 2), offs=offs)


def moe_prefill(
    x2: torch.Tensor,
    ids: torch.Tensor,
    route: torch.Tensor,
    gate_up: NVFP4Tensor,
    down: NVFP4Tensor,
    *,
    top_k: int,
) -> torch.Tensor:
    """x2 [T, H], flat ids/route [T*k], gate_up [E, 2I, H], down [E, H, I] (NVFP4) -> [T, H] in x2.dtype."""
    num_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    tokens = x2.shape[0]
    out = torch.empty((tokens, hidden), dtype=x2.dtype, device=x2.device)
    if tokens == 0:
        return out
    flat = ids.to(torch.int64)
    order = torch.argsort(flat, stable=True)  # pair index of each expert-sorted row
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x2.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = x2.index_select(0, order // top_k)
    buf = scratch(x2.device, x2.dtype, (num_experts, inter, hidden))
    gate = _grouped(rows, dequantize_nvfp4(gate_up, dtype=x2.dtype, rows=(0, inter), out=buf), offs)
    up = _grouped(rows, dequantize_nvfp4(gate_up, dtype=x2.dtype, rows=(inter, inter), out=buf), offs)
    del rows
    act = F.gelu(gate, approximate="tanh").mul_(up)
    del gate, up
    dense_down = dequantize_nvfp4(down, dtype=x2.dtype, out=buf.view(num_experts, hidden, inter))
    y = _grouped(act, dense_down, offs)
    pos = torch.empty_like(order)
    pos.scatter_(0, order, torch.arange(order.numel(), device=x2.device))
    block = min(1024, triton.next_power_of_2(hidden))
    _unsort_sum_kernel[(tokens, triton.cdiv(hidden, block))](
        y,
        pos,
        route,
        out,
        hidden,
        y.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK=block,
        **pdl_args(out.device),
    )
    return out
