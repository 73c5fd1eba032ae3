"""The last step of the MoE paths that write one row per (token, slot) pair: each token's top-k rows added."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs


@triton.jit
def _moe_sum_kernel(
    part_ptr,
    out_ptr,
    hidden,
    stride_pm,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        acc += tl.load(part_ptr + (token * TOP_K + slot) * stride_pm + cols, mask=ok, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + token * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_top_k(per_pair: torch.Tensor, out: torch.Tensor, top_k: int) -> torch.Tensor:
    """out[t] = sum over s of per_pair[t * top_k + s] (fp32 sums; per_pair [T * top_k, H], out [T, H])."""
    tokens, hidden = out.shape
    block = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(tokens, triton.cdiv(hidden, block))](
        per_pair, out, hidden, per_pair.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block,
        **pdl_args(out.device),
    )  # fmt: skip
    return out
