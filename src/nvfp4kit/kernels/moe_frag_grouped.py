"""Fused GELU-tanh MoE for batches of ~8-128 tokens with the fragment MMA of `gemv_mma.py` (SM80+, bf16, GPU only).

At these sizes nearly every expert is touched (64 tokens x top-8 = 512 pairs over 128 experts) and a layer is a
stream of all its expert weights (429 MB for 26B-A4B), so each expert must be read once a step, whatever the
number of its tokens. `moe_frag.py` reads an expert once per (token, slot) pair; here the pairs are sorted by
expert into blocks of 8 (`moe_align`, block_m=8), and a block's 8 pairs are the 8 A rows of the MMA:

  * gate_up: a program per (block, 4 x NW intermediate columns); row group r (KW warps splitting K) has gate and
    up rows of 4 columns as its 8 B columns, so lane 4g + t ends with gate and up of pair g's column: GeGLU, the
    routing weight and down's scale_2 applied in registers, act[pair, column] written in bf16;
  * down: a program per (block, 8 x NW output rows) over act's rows of the block's pairs, written to a
    [pairs, H] fp32 buffer; then `moe_sum.sum_top_k` adds each token's top-k rows.

Blocks of 16 pairs (`block=16`) use the 16-row MMA form (A rows g + 8 are pairs 8-15): for batches where experts
hold more than 8 pairs (~48 tokens and up), so that an expert is not read again for its second block of 8.
NW row groups in a program share the block's activation rows through L1 (the tokens' activations are read from
L2 once per program, not once per 8 weight rows). With NT = 2 or 4 tiles a row group each lane also takes NT - 1
more weight rows (gate_up: 4 more columns a tile; down: 8 more rows) against the activation pairs it already
loaded (`_tiles_loop`): these kernels are bound by L1 throughput, mostly activation loads (ncu, H100, 64 tokens,
one tile: L1 93-96% busy, DRAM 36-43%), which NT tiles cut NT-fold per weight. Blocks past the routing's last are
skipped by their programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.geglu import geglu_sigmoid
from nvfp4kit.kernels.gemv_mma import (
    aligned4,
    group_sum,
    k_loop,
    lane_ids,
    lane_sums,
    step_weights,
    word_acts,
    word_mma,
    zero_acc,
    zero_acc16,
)
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.moe_align import moe_align
from nvfp4kit.kernels.moe_sum import sum_top_k
from nvfp4kit.kernels.nvfp4_tile import fold_scale
from nvfp4kit.kernels.path_limits import GROUPED_ALONE_TOKENS

# default pairs a block: the MMA's A rows 0-7 (rows g + 8 repeat them, as in gemv_mma's 1-8 token form)
BLOCK = 8


@triton.jit
def _block_pairs(pair_ids_ptr, b, row, num_pairs, BLOCK: tl.constexpr):
    """(pair of A row `row` of block b, whether it is one: padding slots hold num_pairs)."""
    pair = tl.load(pair_ids_ptr + b * BLOCK + row)
    return pair, pair < num_pairs


@triton.jit
def _word_tiles(xp, hp, w, acc, acc2, acc3, acc4, word: tl.constexpr, T16: tl.constexpr, NT: tl.constexpr):
    """Word `word` of a step of each of the NT (2 or 4) tiles' weights `w` (`step_weights` of each tile) against
    the same activation pairs: the tiles' MMAs."""
    scale: tl.constexpr = 4 + word // 2
    acc = word_mma(w[0][word], w[0][scale], xp, hp, acc, T16)
    acc2 = word_mma(w[1][word], w[1][scale], xp, hp, acc2, T16)
    if NT == 4:
        acc3 = word_mma(w[2][word], w[2][scale], xp, hp, acc3, T16)
        acc4 = word_mma(w[3][word], w[3][scale], xp, hp, acc4, T16)
    return acc, acc2, acc3, acc4


@triton.jit
def _tiles_step(w_rows, s_rows, x_rows, x_hi, first, words, acc, acc2, acc3, acc4, MASKED: tl.constexpr,
                ASM: tl.constexpr, T16: tl.constexpr, NT: tl.constexpr):  # fmt: skip
    """`gemv_mma.k_step` for NT weight rows a lane (`w_rows` / `s_rows`: a tuple of NT row pointers, NT tiles of
    8 MMA columns) against the same activation pairs: each activation load serves NT times the weights."""
    w = (step_weights(w_rows[0], s_rows[0], first, words, MASKED, ASM),
         step_weights(w_rows[1], s_rows[1], first, words, MASKED, ASM))  # fmt: skip
    if NT == 4:
        w = w + (step_weights(w_rows[2], s_rows[2], first, words, MASKED, ASM),
                 step_weights(w_rows[3], s_rows[3], first, words, MASKED, ASM))  # fmt: skip
    fw = first[:, None]
    for word in tl.static_range(4):
        xp, hp = word_acts(x_rows, x_hi, fw, word, words, MASKED, T16)
        acc, acc2, acc3, acc4 = _word_tiles(xp, hp, w, acc, acc2, acc3, acc4, word, T16, NT)
    return acc, acc2, acc3, acc4


@triton.jit
def _tiles_loop(w_rows, s_rows, x_rows, x_hi, words, lane_word, acc, STEP: tl.constexpr, UNROLL: tl.constexpr,
                ASM: tl.constexpr, T16: tl.constexpr, NT: tl.constexpr):  # fmt: skip
    """`gemv_mma.k_loop` with NT (2 or 4) weight rows a lane (`_tiles_step`): the NT tiles' accumulators."""
    acc2, acc3, acc4 = acc, acc, acc
    full = words // (STEP * UNROLL) * (STEP * UNROLL)
    for w0 in range(0, full, STEP * UNROLL):
        for u in tl.static_range(UNROLL):
            acc, acc2, acc3, acc4 = _tiles_step(w_rows, s_rows, x_rows, x_hi, w0 + u * STEP + lane_word, words, acc,
                                                acc2, acc3, acc4, False, ASM, T16, NT)  # fmt: skip
    for w0 in range(full, words, STEP):
        acc, acc2, acc3, acc4 = _tiles_step(w_rows, s_rows, x_rows, x_hi, w0 + lane_word, words, acc, acc2, acc3,
                                            acc4, True, ASM, T16, NT)  # fmt: skip
    return acc, acc2, acc3, acc4


@triton.jit
def _zero(LANES: tl.constexpr, BLOCK: tl.constexpr):
    if BLOCK == 16:
        acc = zero_acc16(LANES)
    else:
        acc = zero_acc(LANES)
    return acc


@triton.jit
def _tile_rows(
    w_base, s_base, first_row, tile_rows: tl.constexpr, last_row, stride_wn, stride_sn, NT: tl.constexpr
):
    """Row pointers (weights, scales) of a lane's NT tiles, as tuples: rows first_row + t * tile_rows (clamped to
    last_row) for t < NT."""
    r = tl.minimum(first_row, last_row).to(tl.int64)
    w_rows = (w_base + r * stride_wn,)
    s_rows = (s_base + r * stride_sn,)
    for t in tl.static_range(1, NT):
        r = tl.minimum(first_row + t * tile_rows, last_row).to(tl.int64)
        w_rows = w_rows + (w_base + r * stride_wn,)
        s_rows = s_rows + (s_base + r * stride_sn,)
    return w_rows, s_rows


@triton.jit
def _block_loop(w_rows, s_rows, x_ptr, stride_xm, pair_ids_ptr, b, g, num_pairs, TOP_K, words, lane_word,
                LANES: tl.constexpr, STEP: tl.constexpr, UNROLL: tl.constexpr, ASM: tl.constexpr,
                BLOCK: tl.constexpr, NT: tl.constexpr):  # fmt: skip
    """The K loop of a block's program: A row g (and g + 8 with BLOCK 16) is the activation row of that row's
    pair (x row pair // TOP_K; TOP_K 1 for act, whose rows are pairs). Padding rows read row 0. `w_rows` /
    `s_rows`: the lane's NT tiles' rows (`_tile_rows`); returns four accumulators, the first NT of them used."""
    pair, ok = _block_pairs(pair_ids_ptr, b, g, num_pairs, BLOCK)
    x_rows = x_ptr + tl.where(ok, pair // TOP_K, 0).to(tl.int64) * stride_xm
    x_hi = x_rows
    if BLOCK == 16:
        pair_hi, ok_hi = _block_pairs(pair_ids_ptr, b, g + 8, num_pairs, BLOCK)
        x_hi = x_ptr + tl.where(ok_hi, pair_hi // TOP_K, 0).to(tl.int64) * stride_xm
    if NT == 1:
        acc = k_loop(w_rows[0], x_rows, x_hi, s_rows[0], words, lane_word, _zero(LANES, BLOCK), STEP, UNROLL, ASM,
                     BLOCK == 16)  # fmt: skip
        accs = (acc, acc, acc, acc)
    else:
        accs = _tiles_loop(w_rows, s_rows, x_rows, x_hi, words, lane_word, _zero(LANES, BLOCK), STEP, UNROLL, ASM,
                           BLOCK == 16, NT)  # fmt: skip
    return accs


@triton.jit
def _row_sums(acc, half: tl.constexpr, KW: tl.constexpr, NW: tl.constexpr, BLOCK: tl.constexpr):
    """[32 x NW] x 2: each lane's two C columns (2t, 2t + 1) for A row g (half 0) or g + 8 (half 1, BLOCK 16), summed
    over the warps splitting K. The 8-row form keeps row g of quad 0 and row g + 8 of quad 1 (gemv_mma.py)."""
    if BLOCK == 16:
        c0, c1 = group_sum(acc[2 * half], KW, NW), group_sum(acc[2 * half + 1], KW, NW)
    else:
        c0, c1 = lane_sums(acc, KW, NW)
    return c0, c1


@triton.jit
def _store_act(act_ptr, stride_am, pair_ids_ptr, route_ptr, b, row0, num_pairs, gate, up, e, down_s2_ptr,
               first_col, inter, NW: tl.constexpr, ASM: tl.constexpr, BLOCK: tl.constexpr,
               GROUP: tl.constexpr):  # fmt: skip
    """GeGLU of [32 x NW] lanes (lane j: A row row0 + (j % 32) // 4, column j % 4 of row group j // 32, whose
    columns start GROUP apart), times the pair's routing weight and down's scale_2, stored to act[pair, column]."""
    h = geglu_sigmoid(gate, up)
    j = tl.arange(0, 32 * NW)
    out_pair, out_ok = _block_pairs(pair_ids_ptr, b, row0 + (j % 32) // 4, num_pairs, BLOCK)
    route = tl.load(route_ptr + out_pair, mask=out_ok, other=0).to(tl.float32)
    h = h * (route * fold_scale(down_s2_ptr, e, True, ASM))
    out_col = first_col + (j // 32) * GROUP + j % 4
    out = act_ptr + out_pair.to(tl.int64) * stride_am + out_col
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=out_ok & (out_col < inter))


@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gate_up_kernel(
    x_ptr,  # [T, H] as int32 bf16 pairs
    w_ptr,  # [E, 2I, H/8] int32 words
    s_ptr,  # [E, 2I, H/16] E4M3 bytes
    s2_ptr,  # gate_up's scale_2 [E]
    down_s2_ptr,  # down's scale_2 [E], folded into the activation
    route_ptr,  # [P] routing weights
    pair_ids_ptr,  # [blocks * BLOCK] pairs in expert order (moe_align)
    block_expert_ptr,  # [blocks] expert of each block, -1 past the last
    act_ptr,  # [P, I] out
    H,
    inter,
    num_pairs,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_am,
    TOP_K: tl.constexpr,
    KW: tl.constexpr,
    NW: tl.constexpr,
    UNROLL: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK: tl.constexpr,  # 8 or 16 pairs a block (16: A rows g + 8 are pairs 8-15)
    NT: tl.constexpr,  # 8-column MMA tiles a row group (1, 2 or 4; each 4 columns of gate and up)
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    stride_wn = aligned4(stride_wn)
    stride_xm = aligned4(stride_xm)
    b = tl.program_id(0)
    expert = tl.load(block_expert_ptr + b)
    if expert >= 0:
        e = expert.to(tl.int64)
        i, layout_ok = lane_ids(32 * KW * NW)
        g = (i % 32) // 4
        warp = i // 32
        first_col = tl.program_id(1) * 4 * NW * NT
        # B column g: gate (even g) or up (odd) of column col + 4t of tile t
        col = first_col + (warp // KW) * 4 * NT + g // 2
        gate_or_up = tl.where(g % 2 == 0, 0, inter).to(tl.int64)
        w_rows, s_rows = _tile_rows(w_ptr + e * stride_we + gate_or_up * stride_wn,
                                    s_ptr + e * stride_se + gate_or_up * stride_sn, col, 4, inter - 1, stride_wn,
                                    stride_sn, NT)  # fmt: skip
        lane_word = (warp % KW) * 16 + (i % 4) * 4
        accs = _block_loop(w_rows, s_rows, x_ptr, stride_xm, pair_ids_ptr, b, g, num_pairs, TOP_K, H // 8, lane_word,
                           32 * KW * NW, 16 * KW, UNROLL, ASM, BLOCK, NT)  # fmt: skip
        # [32 x NW] a tile: lane j of row group j // 32 holds gate and up of column j % 4 of the tile for A row
        # (j % 32) // 4
        scale = fold_scale(s2_ptr, e, True, ASM) * layout_ok
        for t in tl.static_range(NT):
            for half in tl.static_range(BLOCK // 8):
                gate, up = _row_sums(accs[t], half, KW, NW, BLOCK)
                _store_act(act_ptr, stride_am, pair_ids_ptr, route_ptr, b, 8 * half, num_pairs, gate * scale,
                           up * scale, e, down_s2_ptr, first_col + 4 * t, inter, NW, ASM, BLOCK, 4 * NT)  # fmt: skip


@triton.jit
def _store_part(part_ptr, stride_pm, pair_ids_ptr, b, row0, num_pairs, total0, total1, first_row, H,
                NW: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    """Lane j's two output rows (C columns 2t, 2t + 1 of row group j // 32, whose rows start GROUP apart) for A row
    row0 + (j % 32) // 4 to part[pair, row]."""
    j = tl.arange(0, 32 * NW)
    out_pair, out_ok = _block_pairs(pair_ids_ptr, b, row0 + (j % 32) // 4, num_pairs, BLOCK)
    out_row = first_row + (j // 32) * GROUP + 2 * (j % 4)
    base = part_ptr + out_pair.to(tl.int64) * stride_pm + out_row
    tl.store(base, total0, mask=out_ok & (out_row < H))
    tl.store(base + 1, total1, mask=out_ok & (out_row + 1 < H))


@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_down_kernel(
    act_ptr,  # [P, I] as int32 bf16 pairs (weighted and scaled)
    w_ptr,  # [E, H, I/8] int32 words
    s_ptr,  # [E, H, I/16]
    pair_ids_ptr,
    block_expert_ptr,
    part_ptr,  # [P, H] fp32 out
    H,
    inter,
    num_pairs,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_pm,
    KW: tl.constexpr,
    NW: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK: tl.constexpr,
    NT: tl.constexpr,  # 8-row MMA tiles a row group (1, 2 or 4)
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    stride_wn = aligned4(stride_wn)
    stride_am = aligned4(stride_am)
    b = tl.program_id(0)
    expert = tl.load(block_expert_ptr + b)
    if expert >= 0:
        e = expert.to(tl.int64)
        i, layout_ok = lane_ids(32 * KW * NW)
        g = (i % 32) // 4
        warp = i // 32
        first_row = tl.program_id(1) * 8 * NW * NT
        w_rows, s_rows = _tile_rows(w_ptr + e * stride_we, s_ptr + e * stride_se,
                                    first_row + (warp // KW) * 8 * NT + g, 8, H - 1, stride_wn, stride_sn,
                                    NT)  # fmt: skip
        lane_word = (warp % KW) * 16 + (i % 4) * 4
        accs = _block_loop(w_rows, s_rows, act_ptr, stride_am, pair_ids_ptr, b, g, num_pairs, 1, inter // 8,
                           lane_word, 32 * KW * NW, 16 * KW, 1, ASM, BLOCK, NT)  # fmt: skip
        for t in tl.static_range(NT):
            for half in tl.static_range(BLOCK // 8):  # the scale is already in act
                t0, t1 = _row_sums(accs[t], half, KW, NW, BLOCK)
                _store_part(part_ptr, stride_pm, pair_ids_ptr, b, 8 * half, num_pairs, t0 * layout_ok,
                            t1 * layout_ok, first_row + 8 * t, H, NW, BLOCK, 8 * NT)  # fmt: skip


def default_tiles(tokens: int) -> tuple[int, int]:
    """MMA tiles a row group (gate_up, down) for `tokens`: two above 8 tokens. H100, 26B-A4B MoE layer (session 21,
    scripts/gpu_moe_grouped_probe.py): two tiles take 0.96 / 0.90 / 0.83 / 0.79x the time of one at 32 / 64 / 96 /
    128 tokens, 0.99-1.00x at 16 and 24, 1.04x at 8 (fewer, longer programs for few experts' pairs); session 26:
    0.965x at 16 (152.6 against 158.1 us), and in the engine's 16-sequence decode graph (scripts/gpu_decode_variants.py,
    two alternations, greedy tokens equal) batch 12 1,648.1 / 1,651.9 -> 1,694.7 / 1,696.3 tok/s, 16 2,043.4 /
    2,039.3 -> 2,092.3 / 2,096.0 (+2.5%), batch 8 equal. Four tiles (126 registers a thread in gate_up: a quarter of
    the warps resident) are 2-4% slower than two at 32-96 tokens."""
    return (2, 2) if tokens > 8 else (1, 1)


def fused_moe_grouped(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: NVFP4Tensor,
    down: NVFP4Tensor,
    *,
    gate_up_warps: tuple[int, int] = (2, 2),
    down_warps: tuple[int, int] = (1, 4),
    unroll: int = 1,
    block: int = BLOCK,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """x [T, H] bf16, topk_ids / topk_weights [T, top_k] -> [T, H]; `*_warps` = (warps splitting K, row groups a
    program) of each projection, `block` 8 or 16 pairs an expert block, `tiles` the MMA tiles a row group of each
    projection, 1, 2 or 4 (None: `default_tiles`) (see the module docstring; `moe_frag.frag_experts_supported`
    first)."""
    if block not in (8, 16):
        raise ValueError(f"fused_moe_grouped takes blocks of 8 or 16 pairs, got {block}")
    tiles = default_tiles(x.shape[0]) if tiles is None else tiles
    if any(t not in (1, 2, 4) for t in tiles):
        raise ValueError(f"fused_moe_grouped takes 1, 2 or 4 MMA tiles a row group, got {tiles}")
    tokens, hidden = x.shape
    experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[-1]
    if x.stride(-1) != 1 or x.stride(0) % 8:
        x = x.contiguous()
    pairs = tokens * top_k
    # the per-expert sort where this MoE has the GPU to itself (H100, session 35: batch 64 decode +1.4%); beside
    # the dense MLP on the second stream its 128 programs slowed the gate_up kernel 40% (batch 16 decode -12%)
    align = "experts" if tokens > GROUPED_ALONE_TOKENS else "triton"
    pair_ids, block_expert = moe_align(topk_ids, num_experts=experts, block_m=block, method=align)
    route = topk_weights.reshape(-1).contiguous()
    gu_packed, gu_scale, gu_s2 = gate_up.kernel_operands()
    dn_packed, dn_scale, dn_s2 = down.kernel_operands()
    asm = 2 if gate_up.normal_scales() and down.normal_scales() else 1
    blocks = block_expert.numel()
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    kw, nw = gate_up_warps
    _grouped_gate_up_kernel[(blocks, triton.cdiv(inter, 4 * nw * tiles[0]))](
        x.view(torch.int32), gu_packed.view(torch.int32), gu_scale, gu_s2, dn_s2, route, pair_ids, block_expert,
        act, hidden, inter, pairs, x.stride(0) // 2, gu_packed.stride(0) // 4, gu_packed.stride(1) // 4,
        gu_scale.stride(0), gu_scale.stride(1), act.stride(0),
        TOP_K=top_k, KW=kw, NW=nw, UNROLL=unroll, ASM=asm, BLOCK=block, NT=tiles[0], num_warps=kw * nw,
        num_stages=1,
        **pdl_args(x.device),
    )  # fmt: skip
    part = torch.empty((pairs, hidden), dtype=torch.float32, device=x.device)
    kw, nw = down_warps
    _grouped_down_kernel[(blocks, triton.cdiv(hidden, 8 * nw * tiles[1]))](
        act.view(torch.int32), dn_packed.view(torch.int32), dn_scale, pair_ids, block_expert, part, hidden, inter,
        pairs, act.stride(0) // 2, dn_packed.stride(0) // 4, dn_packed.stride(1) // 4, dn_scale.stride(0),
        dn_scale.stride(1), part.stride(0),
        KW=kw, NW=nw, ASM=asm, BLOCK=block, NT=tiles[1], num_warps=kw * nw, num_stages=1,
        **pdl_args(x.device),
    )  # fmt: skip
    return sum_top_k(part, torch.empty((tokens, hidden), dtype=x.dtype, device=x.device), top_k)
