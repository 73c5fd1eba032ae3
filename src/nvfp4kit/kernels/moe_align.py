"""Sort (token, expert) pairs by expert and pad each expert's run to a multiple of BLOCK_M.

Output, for P = tokens * top_k pairs, E experts and block size B (sizes depend only on P, E and B, so the
buffers are the same on every CUDA-graph replay):
  * `pair_ids` int32 [max_blocks * B]: pair index p (token p // top_k, slot p % top_k) in expert order,
    P where a slot is padding;
  * `block_expert` int32 [max_blocks]: the expert of each block of B rows, -1 for unused blocks;
where max_blocks = ceil(P / B) + min(E, P) bounds the blocks any routing can need.

Four methods (`METHODS`), all free of host syncs:
  * "triton": one Triton program with atomics into a small scratch for decode-sized P (up to ONE_PROGRAM_PAIRS),
    above that a two-kernel counting sort over chunks of pairs (the one program's atomics on 128 counters
    serialise: 104 us at 1,536 tokens on an H100, 16 us chunked); "chunked" is the latter at every size;
  * "experts": one program per expert, each counting all pairs itself (histograms, O(P) a program, no atomics)
    and writing its own run in pair order, up to EXPERTS_PAIRS (the chunked sort above). H100 (session 35):
    2.4 / 2.8 / 3.1 / 3.8 / 3.9 us at 1 / 16 / 64 / 96 / 128 tokens against the one program's 4.7 / 7.3 / 9.4 /
    12.0 / 13.5; the MoE tiles' default, and the grouped fragment MoE's where it runs alone
    (`NVFP4KIT_MOE_ALIGN` makes one method every caller's);
  * "torch": a chain of torch ops (sort, scatter, cumsum, searchsorted), the reference.
They give the same blocks; inside an expert's run the atomics may order pairs differently, which changes no result
(rows of a tile are independent); "experts" and "torch" give the same layout exactly. A one program without
global atomics (a pair's place = earlier pairs on its expert, counted tile against tile) was measured and
removed: H100 (session 28, `scripts/gpu_moe_align_bench.py`, which times the methods side by side), 4.0 / 11.6 /
54 / 105 / 137 us at 1 / 16 / 64 / 96 / 112 tokens against 4.6 / 7.4 / 9.1 / 12.5 / 14.1 us with atomics; engine
decode 6,348 against 7,659 tok/s at batch 112.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs

METHODS = ("triton", "experts", "chunked", "torch")
# NVFP4KIT_MOE_ALIGN (read once, at import) overrides every caller's method, a MoE config's included: an A/B of
# the methods in the engine, one process each
OVERRIDE = os.environ.get("NVFP4KIT_MOE_ALIGN") or None
ONE_PROGRAM_PAIRS = 1024  # H100: one program 13.7 us at 1,024 pairs (chunked 14.7), 21.7 at 2,048 (14.3)
CHUNK_PAIRS = 1024  # pairs a program of the chunked sort counts and places
# each of the per-expert programs reads every pair: timed up to 1,024 (H100: 3.9 us against the one program's
# 13.5 at 128 tokens); more go to the chunked sort
EXPERTS_PAIRS = 1024


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


@triton.jit
def _fill_padding(pair_ids_ptr, start, stop, num_slots, num_pairs, CHUNK: tl.constexpr):
    """Slots [start, stop) of `pair_ids` (clipped to num_slots) marked as padding (= num_pairs)."""
    for s0 in range(start, stop, CHUNK):
        slots = s0 + tl.arange(0, CHUNK)
        tl.store(pair_ids_ptr + slots, tl.zeros([CHUNK], dtype=tl.int32) + num_pairs, mask=slots < num_slots)


@triton.jit
def _store_block_experts(block_expert_ptr, ends, num_blocks, BM: tl.constexpr, BLOCK_CHUNK: tl.constexpr):
    """block_expert[b]: the expert whose padded run holds row b * BM (`ends`: the runs' cumulative ends), -1 past
    the last run."""
    used = tl.max(ends, axis=0)
    for b0 in range(0, num_blocks, BLOCK_CHUNK):
        blocks = b0 + tl.arange(0, BLOCK_CHUNK)
        first = blocks * BM
        expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(first < used, expert, -1), mask=blocks < num_blocks)


# the pair, slot and block counts change with the step's tokens: unspecialised, so one compiled variant serves every
# step (slots = blocks x BM is not always a multiple of 16: with BM 8, an odd block count compiled a second one)
@triton.jit(do_not_specialize=["num_pairs", "num_slots", "num_blocks"])
def _moe_align_kernel(
    ids_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    scratch_ptr,
    num_pairs,
    num_slots,
    num_blocks,
    E_PAD: tl.constexpr,
    BM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    experts = tl.arange(0, E_PAD)
    counts_ptr = scratch_ptr  # [E_PAD] pairs per expert
    taken_ptr = scratch_ptr + E_PAD  # [E_PAD] slots handed out so far
    start_ptr = scratch_ptr + 2 * E_PAD  # [E_PAD] first padded slot of each expert
    tl.store(counts_ptr + experts, tl.zeros([E_PAD], dtype=tl.int32))
    tl.store(taken_ptr + experts, tl.zeros([E_PAD], dtype=tl.int32))
    _fill_padding(pair_ids_ptr, 0, num_slots, num_slots, num_pairs, CHUNK)
    tl.debug_barrier()

    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        ok = pairs < num_pairs
        ids = tl.load(ids_ptr + pairs, mask=ok, other=0).to(tl.int32)
        tl.atomic_add(counts_ptr + ids, tl.full([CHUNK], 1, tl.int32), mask=ok)
    tl.debug_barrier()

    counts = tl.load(counts_ptr + experts, cache_modifier=".cg")  # atomics live in L2
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    tl.store(start_ptr + experts, ends - padded)
    _store_block_experts(block_expert_ptr, ends, num_blocks, BM, BLOCK_CHUNK)
    tl.debug_barrier()

    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        ok = pairs < num_pairs
        ids = tl.load(ids_ptr + pairs, mask=ok, other=0).to(tl.int32)
        rank = tl.atomic_add(taken_ptr + ids, tl.full([CHUNK], 1, tl.int32), mask=ok)
        start = tl.load(start_ptr + ids, mask=ok, other=0, cache_modifier=".cg")
        tl.store(pair_ids_ptr + start + rank, pairs, mask=ok)


def _align_triton(ids: torch.Tensor, num_experts: int, block_m: int, pair_ids, block_expert) -> None:
    e_pad = triton.next_power_of_2(num_experts)
    scratch = torch.empty(3 * e_pad, dtype=torch.int32, device=ids.device)
    chunk = min(1024, max(64, triton.next_power_of_2(ids.numel())))
    _moe_align_kernel[(1,)](
        ids,
        pair_ids,
        block_expert,
        scratch,
        ids.numel(),
        pair_ids.numel(),
        block_expert.numel(),
        E_PAD=e_pad,
        BM=block_m,
        CHUNK=chunk,
        BLOCK_CHUNK=64,
        num_warps=8,
        **pdl_args(ids.device),
    )


@triton.jit(do_not_specialize=["num_pairs", "num_slots", "num_blocks"])
def _align_expert_kernel(
    ids_ptr, pair_ids_ptr, block_expert_ptr, num_pairs, num_slots, num_blocks,
    E_PAD: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program e: expert e's run of `pair_ids` (its pairs in pair order, then padding) and its blocks, from all the
    pairs' counts, which every program takes itself (histograms of CHUNK ids: no atomics, no second launch);
    program e also clears its share of the slots and blocks past the last run."""
    wait_for_inputs(PDL)
    e = tl.program_id(0)
    programs = tl.num_programs(0)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        ok = pairs < num_pairs
        counts += tl.histogram(tl.load(ids_ptr + pairs, mask=ok, other=0).to(tl.int32), E_PAD, mask=ok)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    used = tl.max(ends, axis=0)
    start = tl.sum(tl.where(tl.arange(0, E_PAD) == e, ends - padded, 0), axis=0)
    count = 0
    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        mine = (pairs < num_pairs) & (tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=0) == e)
        tl.store(pair_ids_ptr + start + count + tl.cumsum(mine.to(tl.int32), axis=0) - 1, pairs, mask=mine)
        count += tl.sum(mine.to(tl.int32), axis=0)
    run_end = start + (count + BM - 1) // BM * BM
    pad = start + count + tl.arange(0, BM)
    tl.store(pair_ids_ptr + pad, tl.zeros([BM], dtype=tl.int32) + num_pairs, mask=pad < run_end)
    for b0 in range(start // BM, run_end // BM, 64):
        blocks = b0 + tl.arange(0, 64)
        tl.store(block_expert_ptr + blocks, tl.zeros([64], dtype=tl.int32) + e, mask=blocks < run_end // BM)
    share = (num_slots - used + programs - 1) // programs  # the tail: padding slots and unused blocks
    _fill_padding(pair_ids_ptr, used + e * share, used + (e + 1) * share, num_slots, num_pairs, 64)
    share = (num_blocks - used // BM + programs - 1) // programs
    for b0 in range(used // BM + e * share, used // BM + (e + 1) * share, 64):
        blocks = b0 + tl.arange(0, 64)
        tl.store(block_expert_ptr + blocks, tl.full([64], -1, tl.int32), mask=blocks < num_blocks)


def _align_experts(ids: torch.Tensor, num_experts: int, block_m: int, pair_ids, block_expert) -> None:
    _align_expert_kernel[(num_experts,)](
        ids, pair_ids, block_expert, ids.numel(), pair_ids.numel(), block_expert.numel(),
        E_PAD=triton.next_power_of_2(num_experts), BM=block_m,
        CHUNK=min(ONE_PROGRAM_PAIRS, max(64, triton.next_power_of_2(ids.numel()))), num_warps=4,
        **pdl_args(ids.device),
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_pairs", "num_slots", "fill"])
def _count_chunks_kernel(
    ids_ptr, counts_ptr, pair_ids_ptr, num_pairs, num_slots, fill,
    E_PAD: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program c: counts_ptr[c, e] = pairs of chunk c routed to expert e; pads its share of `pair_ids`."""
    wait_for_inputs(PDL)
    c = tl.program_id(0)
    pairs = c * CHUNK + tl.arange(0, CHUNK)
    ok = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=ok, other=0).to(tl.int32)
    tl.store(counts_ptr + c * E_PAD + tl.arange(0, E_PAD), tl.histogram(ids, E_PAD, mask=ok))
    _fill_padding(pair_ids_ptr, c * fill, (c + 1) * fill, num_slots, num_pairs, CHUNK)


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "num_blocks"])
def _place_chunks_kernel(
    ids_ptr, counts_ptr, bases_ptr, pair_ids_ptr, block_expert_ptr, num_pairs, num_chunks, num_blocks,
    E_PAD: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program c: every expert's padded start from all chunks' counts, plus the pairs of chunks before c, gives
    where chunk c's pairs go; a pair's slot comes from atomics on this program's own row of `bases` (no
    contention between programs). Program 0 also writes `block_expert`."""
    wait_for_inputs(PDL)
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        tile = tl.load(
            counts_ptr + rows[:, None] * E_PAD + experts[None, :], mask=(rows < num_chunks)[:, None], other=0
        )
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((rows < c)[:, None], tile, 0), axis=0)
    padded = (total + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    if c == 0:
        _store_block_experts(block_expert_ptr, ends, num_blocks, BM, 64)
    tl.store(bases_ptr + c * E_PAD + experts, ends - padded + before)
    tl.debug_barrier()  # the whole row is stored before any thread's atomics read it
    pairs = c * CHUNK + tl.arange(0, CHUNK)
    ok = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=ok, other=0).to(tl.int32)
    slot = tl.atomic_add(bases_ptr + c * E_PAD + ids, tl.full([CHUNK], 1, tl.int32), mask=ok)
    tl.store(pair_ids_ptr + slot, pairs, mask=ok)


def _align_chunked(ids: torch.Tensor, num_experts: int, block_m: int, pair_ids, block_expert) -> None:
    chunk = CHUNK_PAIRS
    e_pad = triton.next_power_of_2(num_experts)
    chunks = triton.cdiv(ids.numel(), chunk)
    counts = torch.empty((2, chunks, e_pad), dtype=torch.int32, device=ids.device)  # counts, then bases
    fill = triton.cdiv(triton.cdiv(pair_ids.numel(), chunks), chunk) * chunk
    pdl = pdl_args(ids.device)
    _count_chunks_kernel[(chunks,)](
        ids, counts[0], pair_ids, ids.numel(), pair_ids.numel(), fill, E_PAD=e_pad, CHUNK=chunk, num_warps=4, **pdl
    )  # fmt: skip
    _place_chunks_kernel[(chunks,)](
        ids, counts[0], counts[1], pair_ids, block_expert, ids.numel(), chunks, block_expert.numel(),
        E_PAD=e_pad, BM=block_m, CHUNK=chunk, ROWS=16, num_warps=4, **pdl,
    )  # fmt: skip


def _align_torch(ids: torch.Tensor, num_experts: int, block_m: int, pair_ids, block_expert) -> None:
    num_pairs = ids.numel()
    ids64 = ids.to(torch.int64)
    sorted_ids, order = torch.sort(ids64, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids64, torch.ones_like(ids64))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_ends = torch.cumsum(padded, 0)
    pad_starts = pad_ends - padded
    raw_starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(num_pairs, device=ids.device) - raw_starts[sorted_ids] + pad_starts[sorted_ids]
    pair_ids.fill_(num_pairs)
    pair_ids[slots] = order.to(torch.int32)
    firsts = torch.arange(block_expert.numel(), device=ids.device) * block_m
    expert = torch.searchsorted(pad_ends, firsts, right=True)
    block_expert.copy_(torch.where(firsts < pad_ends[-1], expert, -1))


def moe_align(
    topk_ids: torch.Tensor, *, num_experts: int, block_m: int, method: str = "triton"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair_ids, block_expert) for `topk_ids` [tokens, top_k] (any int dtype); see the module doc. `method`:
    one of METHODS, unless OVERRIDE names another."""
    method = OVERRIDE or method
    if method not in METHODS:
        raise ValueError(f"unknown MoE align method {method!r}; use one of {', '.join(METHODS)}")
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    blocks = max_blocks(ids.numel(), num_experts, block_m)
    pair_ids = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    if ids.numel() == 0:
        block_expert.fill_(-1)
        pair_ids.fill_(0)
        return pair_ids, block_expert
    if method == "triton" and ids.numel() <= ONE_PROGRAM_PAIRS:
        _align_triton(ids, num_experts, block_m, pair_ids, block_expert)
    elif method == "experts" and ids.numel() <= EXPERTS_PAIRS:
        _align_experts(ids, num_experts, block_m, pair_ids, block_expert)
    elif method in ("triton", "experts", "chunked"):
        _align_chunked(ids, num_experts, block_m, pair_ids, block_expert)
    else:
        _align_torch(ids, num_experts, block_m, pair_ids, block_expert)
    return pair_ids, block_expert
