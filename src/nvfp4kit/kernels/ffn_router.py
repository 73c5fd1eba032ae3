"""A MoE layer's FFN inputs and its router in one launch, for decode-sized steps.

`norms.ffn_inputs` (one program a token: the post-attention residual h and its normed copies for the dense
MLP, the experts and the router) then `router.fused_route` (programs over (token tile, expert block)) are two
launches in a row on every MoE layer's critical path. Here the router's programs make their own input: each
recomputes h and the router's input for the tokens of its tile from the residual and the attention output
(a row of 2816 at 26B-A4B, read from L2 by every program; the expert weights are what comes from device
memory), dots it with its experts' rows and meets the tile's other programs as `fused_route`'s do (arrival
counters, kernels/split_k.py: the last to arrive runs the top-k over the tile and resets the counter). Only
the programs of expert block 0 store h and the MLP's and experts' inputs; the router's input is never stored.

The results are meant to be the two launches' to the bit: every row goes through `ffn_inputs`'s own code
(`norms._ffn_row`, with its row block and warps: the same reductions and roundings, the router's input rounded
to the activation dtype as it is stored), and each logit is summed in `fused_route`'s order, K step by K step
(`router.route_tiles`), then rounded as it rounds it. The CPU interpreter sums in that order by construction;
on a GPU the compiler lays each reduction out per kernel: on the H100 (scripts/gpu_ffn_router_bench.py) h, the
normed inputs and the expert ids were equal to the bit, the weights too at 1 token and within an fp32 ulp at 2
(the top-k's normalising sum over other warps). No host syncs: it replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels import norms, router
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.norms import _ffn_row
from nvfp4kit.kernels.router import _count_in_and_route, _round_to_activation
from nvfp4kit.kernels.split_k import arrival_counters
from nvfp4kit.model.ops import Weight

# H100, 26B-A4B (scripts/gpu_ffn_router_bench.py, CUDA graphs): fused 8.25 / 10.90 / 14.56 us at 1 / 2 / 4 tokens
# against 10.72 / 11.54 / 10.70 for the two launches (every program recomputes every token's rows)
FUSED_MAX_TOKENS = 2
# tokens a program recomputes the rows of (an unrolled loop): the decode sizes, up to FUSED_ROUTE_MAX_TOKENS
_TOKENS_PER_TILE = 4


@triton.jit(do_not_specialize=["num_tokens"])  # a per-step count: no variant per batch size
def _ffn_inputs_routed_kernel(
    res_ptr, x_ptr, w_attn_ptr, w_mlp_ptr, w_experts_ptr, router_scale_ptr, w_ptr, scale_ptr,
    h_ptr, mlp_ptr, experts_ptr, logits_ptr, counter_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, n, stride_res, stride_x, stride_w, eps, router_factor,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, ROUND_BF16: tl.constexpr, CAST_WEIGHT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < num_tokens
    mine = tl.program_id(1) * EXPERTS_PER_PROGRAM + tl.arange(0, EXPERTS_PER_PROGRAM)
    mine_ok = mine < num_experts
    dtype = h_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    w_ok = mine_ok[:, None] & (cols < n)[None, :]
    w = tl.load(w_ptr + mine.to(tl.int64)[:, None] * stride_w + cols[None, :], mask=w_ok, other=0.0)
    w = w.to(tl.float32)
    if CAST_WEIGHT:  # the unfused path casts the weight to the activation dtype before its GEMV
        w = _round_to_activation(w, dtype, ROUND_BF16)
    steps = tl.arange(0, BLOCK // BLOCK_K)
    acc = tl.zeros([BLOCK_T, EXPERTS_PER_PROGRAM], tl.float32)
    for i in tl.static_range(BLOCK_T):
        token = tile * BLOCK_T + i
        # expert block 0 stores the rows; a padding slot of the tile recomputes the last token (in bounds,
        # finite) and stores nothing
        row = tl.minimum(token, num_tokens - 1).to(tl.int64)
        stored = tl.where((tl.program_id(1) == 0) & (token < num_tokens), n, 0)
        z = _ffn_row(
            res_ptr, x_ptr, w_attn_ptr, w_mlp_ptr, w_experts_ptr, router_scale_ptr, h_ptr, mlp_ptr, experts_ptr,
            row, stored, n, stride_res, stride_x, eps, router_factor, True, BLOCK,
        )  # fmt: skip
        # fused_route's sum: each K step's products summed on their own, the steps added one by one from zero
        product = z.to(tl.float32)[None, :] * w
        parts = tl.sum(tl.reshape(product, [EXPERTS_PER_PROGRAM, BLOCK // BLOCK_K, BLOCK_K]), axis=2)
        dot = tl.zeros([EXPERTS_PER_PROGRAM], tl.float32)
        for step in tl.static_range(BLOCK // BLOCK_K):
            dot += tl.sum(tl.where(steps[None, :] == step, parts, 0.0), axis=1)  # adds only zeros to the step
        acc = tl.where(tl.arange(0, BLOCK_T)[:, None] == i, dot[None, :], acc)
    logits = _round_to_activation(acc, dtype, ROUND_BF16)  # as the unfused linear returns them
    _count_in_and_route(
        logits, tile, tokens, t_ok, mine, mine_ok, num_experts, logits_ptr, counter_ptr, scale_ptr, weights_ptr,
        ids_ptr, TOP_K, BLOCK_E,
    )  # fmt: skip


def fuses(residual: torch.Tensor, router_weight: Weight) -> bool:
    """Whether `ffn_inputs_routed` takes this call: where `router.fused_route` would (a dense router weight, a
    decode-sized batch of [T, H] rows), up to FUSED_MAX_TOKENS."""
    return router.fuses(residual, router_weight) and residual.shape[0] <= FUSED_MAX_TOKENS


def ffn_inputs_routed(
    residual: torch.Tensor,
    attn_out: torch.Tensor,
    *,
    post_attn_norm: torch.Tensor,
    mlp_norm: torch.Tensor,
    experts_norm: torch.Tensor,
    router_scale: torch.Tensor,
    router_weight: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
    experts_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`norms.ffn_inputs` of a MoE layer, then `router.fused_route` of its router input with a dense weight
    [E, H], in one launch: (h, mlp_in, experts_in [T, H] in residual.dtype, weights fp32 [T, top_k], expert
    ids int64 [T, top_k])."""
    if residual.dim() != 2:
        raise ValueError(f"ffn_inputs_routed takes residual [T, H], got shape {tuple(residual.shape)}")
    t, n = residual.shape
    if router_weight.dim() != 2 or router_weight.shape[1] != n:
        raise ValueError(f"router_weight must be [E, {n}], got shape {tuple(router_weight.shape)}")
    e = router_weight.shape[0]
    router._check(e, top_k, per_expert_scale)
    res, attn = norms._rows(residual, n, "residual"), norms._rows(attn_out, n, "attn_out")
    if attn.shape[0] != t:
        raise ValueError(f"attn_out has {attn.shape[0]} rows, residual has {t}")
    weight = router_weight if router_weight.stride(-1) == 1 else router_weight.contiguous()
    device = residual.device
    h, mlp_in, experts_in = (torch.empty((t, n), dtype=residual.dtype, device=device) for _ in range(3))
    weights, ids = router._outputs(t, top_k, device)
    if t == 0:
        return h, mlp_in, experts_in, weights, ids
    block, warps = norms._row_launch(n)  # the norm kernel's row block and warps: its reductions, its order
    _, per_program, block_k = router.route_tiles(t, n, experts_per_program)
    block_t = min(triton.next_power_of_2(t), _TOKENS_PER_TILE)
    tiles = triton.cdiv(t, block_t)
    norm_weights = {"post_attn_norm": post_attn_norm, "mlp_norm": mlp_norm, "experts_norm": experts_norm,
                    "router_scale": router_scale}  # fmt: skip
    vectors = [norms._vector(w, n, name) for name, w in norm_weights.items()]
    logits = torch.empty((t, e), dtype=torch.float32, device=device)
    counters = arrival_counters(device, tiles)
    _ffn_inputs_routed_kernel[(tiles, triton.cdiv(e, per_program))](
        res, attn, *vectors, weight, per_expert_scale.contiguous(), h, mlp_in, experts_in, logits, counters,
        weights, ids, t, e, n, res.stride(0), attn.stride(0), weight.stride(0), float(eps), n**-0.5,
        TOP_K=top_k, BLOCK_T=block_t, EXPERTS_PER_PROGRAM=per_program, BLOCK=block, BLOCK_K=min(block_k, block),
        BLOCK_E=triton.next_power_of_2(e), ROUND_BF16=residual.dtype == torch.bfloat16,
        CAST_WEIGHT=weight.dtype != residual.dtype, num_warps=warps, **pdl_args(device),
    )  # fmt: skip
    return h, mlp_in, experts_in, weights, ids
