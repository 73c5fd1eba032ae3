"""Routing in one launch: softmax over all experts, top-k, renormalise, times the per-expert scale.

One program per token holds its E logits in registers; top-k is k rounds of "take the largest left" (ties go
to the lower expert id), and the chosen weights are written in rank order, largest first, as torch.topk
sorts them. The ids are always distinct and in range, even for a row of NaN or inf logits. The projection producing the logits stays a linear of the op backend. The reference is the torch
backend's `route` (fp32 softmax); no host syncs, so the op replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs


@triton.jit
def _route_kernel(
    logits_ptr,
    scale_ptr,
    weights_ptr,
    ids_ptr,
    num_experts,
    stride_logits,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    ok = experts < num_experts
    x = tl.load(logits_ptr + row * stride_logits + experts, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, axis=0)
    rank = tl.full([BLOCK_E], -1, tl.int32)
    # probabilities not taken yet: padding never wins; NaN (a garbage padding row of a batch) still yields
    # distinct valid ids, so the MoE never indexes past the experts
    left = tl.where(ok, tl.where(p == p, p, -0.5), -1.0)
    for i in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, experts, BLOCK_E), axis=0)
        rank = tl.where(experts == pick, i, rank)
        left = tl.where(experts == pick, -1.0, left)
    chosen = rank >= 0
    total = tl.sum(tl.where(chosen, p, 0.0), axis=0)
    scale = tl.load(scale_ptr + experts, mask=chosen, other=0.0).to(tl.float32)
    out = row * TOP_K + rank
    tl.store(weights_ptr + out, p / total * scale, mask=chosen)
    tl.store(ids_ptr + out, experts.to(tl.int64), mask=chosen)


def route(
    logits: torch.Tensor, per_expert_scale: torch.Tensor, *, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights fp32 [T, top_k], expert ids int64 [T, top_k]), largest weight first."""
    if logits.dim() != 2:
        raise ValueError(f"route takes logits [T, E], got shape {tuple(logits.shape)}")
    t, e = logits.shape
    if not 0 < top_k <= e:
        raise ValueError(f"top_k={top_k} must be in 1..{e} (the number of experts)")
    if per_expert_scale.numel() != e:
        raise ValueError(f"per_expert_scale has {per_expert_scale.numel()} entries, expected {e}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    if t:
        block = triton.next_power_of_2(e)
        _route_kernel[(t,)](
            logits,
            per_expert_scale.contiguous(),
            weights,
            ids,
            e,
            logits.stride(0),
            TOP_K=top_k,
            BLOCK_E=block,
            num_warps=max(1, min(8, block // 128)),
            **pdl_args(logits.device),
        )
    return weights, ids
