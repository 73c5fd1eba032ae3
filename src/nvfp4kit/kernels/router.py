"""Routing: softmax over all experts, top-k, renormalise, times the per-expert scale, in one launch.

`route` takes the logits [T, E] from the router's linear (one program per token). `fused_route` also computes
the logits z @ W^T from a dense (BF16/FP16/FP32) weight, so a decode step's router is one launch instead of a
cuBLAS GEMV plus `route`: programs over (token tile, expert block) each write their experts' logits to a small
fp32 workspace, count themselves in on the token tile's arrival counter (kernels/split_k.py), and the last to
arrive runs the same top-k over the whole tile, read back from the workspace (so the result does not depend on
which program came last), and resets the counter. Each logit is rounded to the activation dtype before the
softmax, as the unfused path's linear returns it, so both pick the same experts.

Top-k is k rounds of "take the largest left" (ties go to the lower expert id), and the chosen weights are
written in rank order, largest first, as torch.topk sorts them. The ids are always distinct and in range, even
for a row of NaN or inf logits. The reference is the torch backend's `route` (fp32 softmax); no host syncs, so
both ops replay inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.fp8_rows import FP8RowTensor
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.split_k import arrival_counters
from nvfp4kit.model.ops import Weight

# Up to this many tokens the fused kernel replaces the GEMV + route pair; above, the two-step path (cuBLAS does
# the projection) is kept. H200, 26B-A4B router alone (scripts/gpu_router_bench.py, CUDA graphs): one expert a
# program 7.9 / 7.8 / 15.7 us at 1 / 4 / 16 tokens, cuBLAS GEMV + route 8.5 / 8.9 / 8.8 us
FUSED_ROUTE_MAX_TOKENS = 4
_TOKENS_PER_TILE = 16
_PRODUCT_ELEMENTS = 4096  # the [tokens, experts, k] product one K step of a program holds


@triton.jit
def _top_k_rows(
    x, rows, row_ok, experts, num_experts, scale_ptr, weights_ptr, ids_ptr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr
):  # fmt: skip
    """x [rows, BLOCK_E] fp32 logits (padding experts -inf) -> the rows' weights and ids, largest first."""
    ok = (experts < num_experts)[None, :]
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    every = experts[None, :] + tl.zeros_like(rows)[:, None]
    rank = tl.full(p.shape, -1, tl.int32)
    # probabilities not taken yet: padding never wins; NaN (a garbage padding row of a batch) still yields
    # distinct valid ids, so the MoE never indexes past the experts
    left = tl.where(ok, tl.where(p == p, p, -0.5), -1.0)
    for i in tl.static_range(TOP_K):
        best = tl.max(left, axis=1)
        pick = tl.min(tl.where(left == best[:, None], every, BLOCK_E), axis=1)
        taken = every == pick[:, None]
        rank = tl.where(taken, i, rank)
        left = tl.where(taken, -1.0, left)
    chosen = rank >= 0
    total = tl.sum(tl.where(chosen, p, 0.0), axis=1)
    scale = tl.load(scale_ptr + every, mask=chosen, other=0.0).to(tl.float32)
    out = rows.to(tl.int64)[:, None] * TOP_K + rank
    store = chosen & row_ok[:, None]
    tl.store(weights_ptr + out, p / total[:, None] * scale, mask=store)
    tl.store(ids_ptr + out, every.to(tl.int64), mask=store)


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
    rows = tl.program_id(0) + tl.arange(0, 1)
    experts = tl.arange(0, BLOCK_E)
    ok = (experts < num_experts)[None, :]
    x = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_logits + experts[None, :], mask=ok, other=0.0
    )
    x = tl.where(ok, x.to(tl.float32), float("-inf"))
    _top_k_rows(x, rows, rows >= 0, experts, num_experts, scale_ptr, weights_ptr, ids_ptr, TOP_K, BLOCK_E)


@triton.jit
def _round_to_activation(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 x rounded to the activation dtype, kept in fp32. bf16: round to nearest even on the bits, the same as
    the GPU's conversion (the CPU interpreter's conversion truncates, which would pick other experts there)."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _count_in_and_route(
    logits, tile, tokens, t_ok, mine, mine_ok, num_experts, logits_ptr, counter_ptr, scale_ptr, weights_ptr,
    ids_ptr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """A program's logits [tokens, mine] into the workspace, then counted in on the tile's counter; the last
    program of the tile to arrive routes every token of it from the workspace and resets the counter."""
    slots = logits_ptr + tokens.to(tl.int64)[:, None] * num_experts + mine[None, :]
    tl.store(slots, logits, mask=t_ok[:, None] & mine_ok[None, :])
    tl.debug_barrier()  # every thread's logits are issued before the arrival is counted
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        experts = tl.arange(0, BLOCK_E)
        e_ok = (experts < num_experts)[None, :]
        every = logits_ptr + tokens.to(tl.int64)[:, None] * num_experts + experts[None, :]
        x = tl.load(every, mask=t_ok[:, None] & e_ok, other=0.0, cache_modifier=".cg")
        x = tl.where(e_ok, x, float("-inf"))
        _top_k_rows(x, tokens, t_ok, experts, num_experts, scale_ptr, weights_ptr, ids_ptr, TOP_K, BLOCK_E)
        tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next call (and graph replay)


@triton.jit(do_not_specialize=["num_tokens"])  # a per-step count: no variant per batch size
def _fused_route_kernel(
    z_ptr, w_ptr, scale_ptr, logits_ptr, counter_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, hidden, stride_z, stride_w,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, ROUND_BF16: tl.constexpr, CAST_WEIGHT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < num_tokens
    mine = tl.program_id(1) * EXPERTS_PER_PROGRAM + tl.arange(0, EXPERTS_PER_PROGRAM)
    mine_ok = mine < num_experts
    z_rows = z_ptr + tokens.to(tl.int64)[:, None] * stride_z
    w_rows = w_ptr + mine.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_T, EXPERTS_PER_PROGRAM], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k < hidden)[None, :]
        z = tl.load(z_rows + k[None, :], mask=t_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_rows + k[None, :], mask=mine_ok[:, None] & k_ok, other=0.0).to(tl.float32)
        if CAST_WEIGHT:  # the unfused path casts the weight to the activation dtype before its GEMV
            w = _round_to_activation(w, z_ptr.dtype.element_ty, ROUND_BF16)
        acc += tl.sum(z.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    logits = _round_to_activation(
        acc, z_ptr.dtype.element_ty, ROUND_BF16
    )  # as the unfused linear returns them
    _count_in_and_route(
        logits, tile, tokens, t_ok, mine, mine_ok, num_experts, logits_ptr, counter_ptr, scale_ptr, weights_ptr,
        ids_ptr, TOP_K, BLOCK_E,
    )  # fmt: skip


def _check(e: int, top_k: int, per_expert_scale: torch.Tensor) -> None:
    if not 0 < top_k <= e:
        raise ValueError(f"top_k={top_k} must be in 1..{e} (the number of experts)")
    if per_expert_scale.numel() != e:
        raise ValueError(f"per_expert_scale has {per_expert_scale.numel()} entries, expected {e}")


def _outputs(t: int, top_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.empty((t, top_k), dtype=torch.float32, device=device)
    return weights, torch.empty((t, top_k), dtype=torch.int64, device=device)


def route(
    logits: torch.Tensor, per_expert_scale: torch.Tensor, *, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights fp32 [T, top_k], expert ids int64 [T, top_k]), largest weight first."""
    if logits.dim() != 2:
        raise ValueError(f"route takes logits [T, E], got shape {tuple(logits.shape)}")
    t, e = logits.shape
    _check(e, top_k, per_expert_scale)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights, ids = _outputs(t, top_k, logits.device)
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


def fuses(z: torch.Tensor, weight: Weight) -> bool:
    """Whether `fused_route` takes this call: a dense weight and a decode-sized batch."""
    dense = not isinstance(weight, (NVFP4Tensor, FP8RowTensor))
    return dense and z.dim() == 2 and z.shape[0] <= FUSED_ROUTE_MAX_TOKENS


def route_tiles(t: int, hidden: int, experts_per_program: int | None = None) -> tuple[int, int, int]:
    """`fused_route`'s (tokens per tile, experts per program, K step) for t tokens of `hidden` features (the
    K step also sets the order its logits are summed in, which kernels/ffn_router.py follows)."""
    block_t = min(triton.next_power_of_2(t), _TOKENS_PER_TILE)
    per_program = experts_per_program or 1  # one expert a program: 2 and 4 were 5-80% slower on the H200
    per_program = triton.next_power_of_2(per_program)
    block_k = max(16, min(512, _PRODUCT_ELEMENTS // (block_t * per_program), triton.next_power_of_2(hidden)))
    return block_t, per_program, block_k


def fused_route(
    z: torch.Tensor,
    weight: torch.Tensor,
    per_expert_scale: torch.Tensor,
    *,
    top_k: int,
    experts_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """route(z @ weight^T rounded to z.dtype) in one launch: z [T, H], a dense weight [E, H]."""
    if z.dim() != 2 or weight.dim() != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_route takes z [T, H] and weight [E, H], got {tuple(z.shape)}, {tuple(weight.shape)}"
        )
    (t, hidden), e = z.shape, weight.shape[0]
    _check(e, top_k, per_expert_scale)
    z = z if z.stride(-1) == 1 else z.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    weights, ids = _outputs(t, top_k, z.device)
    if t == 0:
        return weights, ids
    block_t, per_program, block_k = route_tiles(t, hidden, experts_per_program)
    tiles = triton.cdiv(t, block_t)
    logits = torch.empty((t, e), dtype=torch.float32, device=z.device)
    _fused_route_kernel[(tiles, triton.cdiv(e, per_program))](
        z, weight, per_expert_scale.contiguous(), logits, arrival_counters(z.device, tiles), weights, ids,
        t, e, hidden, z.stride(0), weight.stride(0),
        TOP_K=top_k, BLOCK_T=block_t, EXPERTS_PER_PROGRAM=per_program, BLOCK_K=block_k,
        BLOCK_E=triton.next_power_of_2(e), ROUND_BF16=z.dtype == torch.bfloat16, CAST_WEIGHT=weight.dtype != z.dtype,
        num_warps=4, **pdl_args(z.device),
    )  # fmt: skip
    return weights, ids
