"""Attention over the engine's KV pools (paged global blocks or per-request sliding rings), in Triton.

One kernel serves decode and chunked prefill. A program takes one *work item* (a sequence and its first query
token) and one KV head, and computes a tile of BLOCK_M rows = BLOCK_Q query tokens x the GROUP query heads that
share that KV head (GQA), so every K/V tile it loads serves all of them. Keys are visited in BLOCK_N tiles with an
online softmax; each key position is mapped to its pool row in registers (ring: ring * ring_size + p % ring_size;
paged: block_table[p // block_size] * block_size + p % block_size). Scale is 1.0 (Gemma 4's q and k are
RMS-normalised). Masks: causal, plus p_q - window < p_k for sliding layers.

Decode (one query token per item) can split each sequence's keys over `num_splits` programs (flash-decoding):
each writes a normalised partial output and its log-sum-exp, and a small kernel merges them. The split count is
a runtime argument (only split / not split is compile-time), so a new count costs no compile.

k_eq_v layers that store only V (= the normalised shared projection) derive K in registers: K = rope(V * w_k)
with the layer's inverse frequencies. RoPE pairs are (i, i + D/2); only the first `rotary_pairs` frequencies are
non-zero (proportional RoPE: 64 of 256), so the scores are (q w_k) . V over the pass-through columns (k_norm's
weight folded into q once) plus two small dots over the rotated columns, with sin/cos only where they matter.

K/V tiles go into the dots in their storage units: BF16 pools as bf16, FP8 pools as fp16 (exact; hardware
conversion on SM89+, integer bit operations on SM80 and in the interpreter); the per-tensor scales multiply the
scores and the output, never each element. Nothing here is Hopper-only. Metadata are device tensors and no launch
reads a value back to the host, so the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.arch_limits import limits_or_nearest
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.attention_pools import (
    DerivedKey,
    check_attention_args,
    derived_key_queries,
    dot_dtype_code,
    load_kv_tile,
    load_kv_tile_unmasked,
    next_pow2,
    pool_operands,
    rotated_key_scores,
)
from nvfp4kit.kernels.configs import interpreting, kernel_capability, sm_count, timed_tiles_fit
from nvfp4kit.kernels.kv_write import kv_format
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs

# the per-step metadata rows of both attention kernels: slices of one buffer at 4 x count bytes, so their 16-byte
# alignment changes with the step's sequence and item counts (only scalars are loaded from them: nothing to lose)
_STEP_POINTERS = ("item_seq_ptr", "item_q0_ptr", "seq_start_ptr", "seq_len_ptr", "seq_offset_ptr",
                  "block_table_ptr", "ring_ptr")  # fmt: skip


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # query rows per program (BLOCK_Q tokens x GROUP heads, padded)
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # a cap a thread (Triton's `maxnreg`): resident blocks an SM follow it


# Registers a thread of a 4-warp decode tile may use: 65,536 / (3 blocks x 128 threads), rounded down to a multiple
# of 8, so three blocks fit an SM whatever the Triton version allocates. Uncapped, the global tile took 177 on sm_90
# (two blocks), and batch 96's 384 programs (2 key splits) ran in two waves of 264 where they fit one of 396: 149 ->
# 178 us a layer in session 30 (H100) while batch 112, two waves either way, went 251 -> 180. The sliding tile takes
# 167 with Triton 3.6 (the timed 144 us) and 174 with 3.9. Triton 3.6 compiles both capped tiles without spills
# (3.9: 8 / 24 B). The cap on the global tile is untimed.
_DECODE_REGISTERS = 168

# FP8 stored-K decode tiles (sliding layers) take three pipeline stages where three such blocks still fit an SM's
# shared memory (sm_80/87/90/100; not sm_86/89/120, 100 KB): 26B-A4B's sliding layer on the H100 (session 31) went
# 146 -> 130 us at batch 96 and 191 -> 168 at 112 (Triton 3.6; 42 KB a block, 26 KB at two stages). The global
# tile's shared memory did not change with its stages (its K is derived in registers).
_DECODE_STAGES = 3


def select_config(
    head_dim: int, group: int, *, decode: bool, fp8: bool = False, capability: tuple[int, int] | None = None
) -> AttentionConfig:
    """Tile sizes by head size, mode and KV dtype: tiles that compile without register spills for sm_90 (ptxas -v)
    at head_dim 256 and 512, the fastest of those timed on H100 (docs/benchmarks.md, "Attention kernels").
    Decode at head dim 512 on other cards (`capability`, see `timed_tiles_fit`) takes 8 warps: on sm_80/86 4 warps
    spilled 400-660 B a thread with libdevice's sin/cos (since session 30, Triton 3.6: 255 registers unspilled, 8
    warps 245-248; eight resident warps an SM either way); on sm_89/120 8 warps double the resident warps (one
    block fits an SM either way). Untimed on those cards. 4-warp decode tiles cap their registers so
    three blocks fit an SM (`_DECODE_REGISTERS`), and FP8 stored-K ones take three stages where three blocks still
    fit (`_DECODE_STAGES`)."""
    min_rows = 1 if interpreting() else 16  # tensor-core dots need M >= 16
    rows = max(min_rows, next_pow2(group))
    if decode:
        wide = head_dim >= 512
        warps = (4 if timed_tiles_fit(capability) else 8) if wide else (4 if fp8 or head_dim < 256 else 8)
        cap = _DECODE_REGISTERS if warps == 4 else None
        block_n = 16 if wide else 32
        stages = 2
        if fp8 and not wide and warps == 4:
            limits = limits_or_nearest(capability or (9, 0))
            tiles = _DECODE_STAGES * 2 * block_n * head_dim  # K and V bytes a block buffers (an upper bound)
            stages = (
                _DECODE_STAGES if 3 * (tiles + limits.smem_reserved_per_block) <= limits.smem_per_sm else 2
            )
        return AttentionConfig(rows, block_n, num_warps=warps, num_stages=stages, max_registers=cap)
    warps = 8 if head_dim >= 256 else 4
    return AttentionConfig(max(rows, 64 if head_dim <= 256 else 32), 32, num_warps=warps, num_stages=2)


def prefill_block_q(head_dim: int, group: int) -> int:
    """Query tokens per prefill work item for this layer shape."""
    return max(1, select_config(head_dim, group, decode=False).block_m // next_pow2(group))


def decode_blocks_per_sm(config: AttentionConfig, capability: tuple[int, int]) -> int:
    """Blocks of a decode tile one SM holds, by its threads and registers (an uncapped tile counted at 255); its
    shared memory was sized to fit as many (`select_config`)."""
    limits = limits_or_nearest(capability)
    return max(1, limits.resident_blocks(num_warps=config.num_warps, registers=config.max_registers or 255))


_MIN_SPLIT_KEYS = 32  # two 16-key tiles: batch 1 at 816 keys ran fastest at 24 splits (H100, session 31)
_MAX_SPLITS = 128  # 256 and 512 were slower at 128K keys (H100)


def choose_num_splits(
    num_items: int,
    kv_heads: int,
    max_keys: int,
    *,
    device: torch.device,
    head_dim: int,
    group: int,
    fp8: bool,
) -> int:
    """Key splits per decode item, counted in waves: the grid is items x KV heads x splits programs, and a wave is
    as many as the SMs hold at once (`decode_blocks_per_sm`). A program's time follows its share of the keys plus
    its partial result (written, then read by the merge: 8 x group bytes a head dimension against 2 x KV bytes a
    key), so the count with the least waves x that time wins; a larger count must win by 5%. At least 32 keys a
    split, at most 128 splits. On the H100 (26B-A4B, 816 keys, session 31) this picks the fastest or near-fastest
    timed count at batch 1-112 where the old rule (four programs an SM, 128 keys a split) lost up to 25%: the
    global layer at batch 64 took 87 us at 3 splits, 110 at the old 4; batch 1 runs 25 splits, not 6."""
    capability = kernel_capability(device)
    if capability is None:
        return 1
    slots = _decode_slots(capability, sm_count(device), head_dim, group, fp8)
    return wave_splits(num_items * kv_heads, slots, max_keys, group=group, fp8=fp8)


def wave_splits(programs: int, slots: int, max_keys: int, *, group: int, fp8: bool) -> int:
    """`choose_num_splits` for `programs` (items x KV heads) of a tile `slots` of which run at once."""
    limit = max(1, min(max_keys // _MIN_SPLIT_KEYS, _MAX_SPLITS))
    keys = max(max_keys, 1) // _MIN_SPLIT_KEYS * _MIN_SPLIT_KEYS or 1  # a cache key that changes every 32
    return _fewest_waves(max(1, programs), slots, limit, group * 4 / ((1 if fp8 else 2) * keys))


@functools.lru_cache(maxsize=64)
def _decode_slots(capability: tuple[int, int], sms: int, head_dim: int, group: int, fp8: bool) -> int:
    """Decode programs the card holds at once (one wave)."""
    config = select_config(head_dim, group, decode=True, fp8=fp8, capability=capability)
    return sms * decode_blocks_per_sm(config, capability)


@functools.lru_cache(maxsize=4096)
def _fewest_waves(programs: int, slots: int, limit: int, partial: float) -> int:
    """`partial`: a split's partial result over its item's KV bytes."""
    best, best_cost = 1, float(math.ceil(programs / slots))
    for splits in range(2, limit + 1):
        cost = math.ceil(programs * splits / slots) / splits * (1 + partial * splits)
        if cost < 0.95 * best_cost:
            best, best_cost = splits, cost
    return best


def merge_chunk(num_splits: int) -> int:
    """Splits the merge kernel sums at a time (its one compile-time size: 2, 4 or 8, so three variants)."""
    return min(8, next_pow2(num_splits))


def split_variant(num_splits: int) -> int:
    """What of a split count the decode kernels are compiled for: 0 (no split) or the merge's chunk."""
    return 0 if num_splits <= 1 else merge_chunk(num_splits)


# per-step values (metadata rows sliced at 4 x count bytes, the block-table width, the token and split counts)
# are plain runtime arguments: specialising them on == 1 / % 16 / alignment would compile a variant per step shape
@triton.jit(do_not_specialize=[*_STEP_POINTERS, "stride_bt", "num_rows", "num_splits"])
def _paged_attention_kernel(
    q_ptr, out_ptr, part_acc_ptr, part_lse_ptr,
    k_ptr, v_ptr, k_factor, v_factor,
    knorm_ptr, inv_freq_ptr,
    item_seq_ptr, item_q0_ptr,
    seq_start_ptr, seq_len_ptr, seq_offset_ptr, block_table_ptr, ring_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
    window, ring_size, block_size, num_q_heads, num_rows, num_splits,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
    RING: tl.constexpr, SLIDING: tl.constexpr, DERIVE_K: tl.constexpr, KV_FORMAT: tl.constexpr,
    NATIVE_FP8: tl.constexpr, COMPUTE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(item_seq_ptr + item)
    q0 = tl.load(item_q0_ptr + item)
    start = tl.load(seq_start_ptr + seq)
    qlen = tl.load(seq_len_ptr + seq)
    qoff = tl.load(seq_offset_ptr + seq)
    if COMPUTE == 1:
        ct = tl.bfloat16
    elif COMPUTE == 2:
        ct = tl.float16
    else:
        ct = tl.float32

    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // GROUP_P2
    g = rows % GROUP_P2
    row_ok = (rows // GROUP_P2 < BLOCK_Q) & (g < GROUP) & (tok < qlen)
    head = kv_head * GROUP + g
    q_pos = start + tok
    q_rows = (qoff + tok).to(tl.int64) * stride_qt + head * stride_qh

    # keys this program visits: [lo, hi), the union over its rows, then this split's share
    hi = start + tl.minimum(qlen, q0 + BLOCK_Q)
    lo = 0
    if SLIDING:
        lo = tl.maximum(start + q0 - window + 1, 0)
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)

    cols = tl.arange(0, D)
    q = tl.load(q_ptr + q_rows[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if DERIVE_K:
        q, q_r1, q_r2, w_r1, w_r2, freq = derived_key_queries(
            q, q_ptr, q_rows, row_ok, knorm_ptr, inv_freq_ptr, D, ROT, ct
        )
        score_factor = v_factor
    else:
        q = q.to(ct)
        score_factor = k_factor
    if RING:
        ring_base = tl.load(ring_ptr + seq).to(tl.int64) * ring_size

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        # with stored K, rows past the keys read the last key's slot: every row a K/V tile loads is then one of
        # this sequence's keys, finite whatever other slots hold, so both tiles load unmasked (those rows' scores
        # become -inf); sliding decode at batch 96, H100: 160 -> 144 us. Derived K keeps the masked V tile (its
        # loop is longer and spent the registers: slower unmasked)
        rows_n = tl.arange(0, BLOCK_N)
        if not DERIVE_K:
            rows_n = tl.minimum(rows_n, hi - 1 - n0)
        if RING:
            # one scalar modulo a tile, not one a key: the keys of a tile wrap the ring at most once (a window is
            # shorter than the ring); the minimum keeps derived K's rows past the keys inside this ring
            wrap = n0 % ring_size + rows_n
            slot = ring_base + tl.minimum(tl.where(wrap >= ring_size, wrap - ring_size, wrap), ring_size - 1)
        else:
            pos = n0 + rows_n  # a clamped row is a key: its block is this sequence's
            blk = tl.load(block_table_ptr + seq * stride_bt + pos // block_size, mask=pos < hi, other=0)
            slot = blk.to(tl.int64) * block_size + pos % block_size
        v_rows = v_ptr + slot * stride_vs + kv_head * stride_vh
        if DERIVE_K:
            v = load_kv_tile(v_rows[:, None] + cols[None, :], k_ok[:, None], KV_FORMAT, NATIVE_FP8, ct)
            scores = tl.dot(q, tl.trans(v), input_precision=PRECISION)
            scores += rotated_key_scores(
                q_r1, q_r2, w_r1, w_r2, freq, v_rows, k_ok, k_pos, D, ROT, KV_FORMAT, NATIVE_FP8, ct, PRECISION,
            )  # fmt: skip
        else:
            v = load_kv_tile_unmasked(v_rows[:, None] + cols[None, :], KV_FORMAT, NATIVE_FP8, ct)
            k_rows = k_ptr + slot * stride_ks + kv_head * stride_kh
            kt = load_kv_tile_unmasked(k_rows[:, None] + cols[None, :], KV_FORMAT, NATIVE_FP8, ct)
            scores = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
        scores = scores * score_factor
        keep = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(keep, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(ct), v, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    acc = acc * (v_factor / safe_l)[:, None]
    # a padding sequence (no tokens) of a fixed-size decode batch stores zeros (and empty partials) in its row, if
    # it has one, so the row never holds stale memory that would flow on into the router
    store_ok = row_ok
    if BLOCK_Q == 1:
        limit = tl.where(qoff < num_rows, tl.maximum(qlen, 1), 0)
        store_ok = (rows // GROUP_P2 < BLOCK_Q) & (g < GROUP) & (tok < limit)
    if not SPLIT:
        out_rows = (qoff + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(
            out_ptr + out_rows[:, None] + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=store_ok[:, None],
        )
    else:  # decode: one token per item, so a row is one query head; a split past the keys stores nothing
        part = (item * num_q_heads + head) * num_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
        store_ok = tl.where(hi > lo, store_ok, False)
        tl.store(part_lse_ptr + part, lse, mask=store_ok)
        tl.store(part_acc_ptr + part[:, None] * D + cols[None, :], acc, mask=store_ok[:, None])


@triton.jit(do_not_specialize=[*_STEP_POINTERS[:5], "num_rows", "num_splits"])
def _merge_splits_kernel(
    part_acc_ptr, part_lse_ptr, out_ptr, item_seq_ptr, item_q0_ptr, seq_start_ptr, seq_len_ptr, seq_offset_ptr,
    stride_ot, stride_oh, window, num_q_heads, num_rows, num_splits,
    CHUNK: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    item = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(item_seq_ptr + item)
    qoff = tl.load(seq_offset_ptr + seq)
    # the splits that held keys, as the attention kernel divided them: graphs are captured with the split count
    # of the longest context, so at a short one most splits are empty (and stored nothing)
    start = tl.load(seq_start_ptr + seq)
    hi = start + tl.minimum(tl.load(seq_len_ptr + seq), 1)
    lo = 0
    if SLIDING:
        lo = tl.maximum(start + tl.load(item_q0_ptr + item) - window + 1, 0)
    keys = tl.maximum(hi - lo, 0)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(keys, num_splits), BLOCK_N) * BLOCK_N, 1)
    live = tl.cdiv(keys, chunk)
    base = (item * num_q_heads + head) * num_splits
    top = tl.full([CHUNK], float("-inf"), tl.float32)
    for first in range(0, live, CHUNK):  # the largest log-sum-exp (a maximum: exact in any order)
        idx = first + tl.arange(0, CHUNK)
        top = tl.maximum(top, tl.load(part_lse_ptr + base + idx, mask=idx < live, other=float("-inf")))
    top = tl.max(top, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    cols = tl.arange(0, D)
    out = tl.zeros([D], tl.float32)
    total = tl.zeros([CHUNK], tl.float32)
    for first in range(0, live, CHUNK):  # a few splits at a time keeps the tile small
        idx = first + tl.arange(0, CHUNK)
        lse = tl.load(part_lse_ptr + base + idx, mask=idx < live, other=float("-inf"))
        weight = tl.exp(lse - top)
        acc = tl.load(
            part_acc_ptr + (base + idx)[:, None] * D + cols[None, :],
            mask=(idx < live)[:, None],
            other=0.0,
        )
        out += tl.sum(acc * weight[:, None], 0)
        total += weight
    out = out / tl.maximum(tl.sum(total, 0), 1e-30)
    dst = out_ptr + qoff.to(tl.int64) * stride_ot + head * stride_oh + cols
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=cols < tl.where(qoff < num_rows, D, 0))  # padding: 0


def paged_attention(
    q: torch.Tensor,
    *,
    v_store: torch.Tensor,
    k_store: torch.Tensor | None,
    batch: AttentionBatch,
    items: WorkItems,
    window: int | None,
    ring_size: int | None = None,
    block_size: int | None = None,
    v_scale: float = 1.0,
    k_scale: float = 1.0,
    derived_key: DerivedKey | None = None,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over a pool [rows, Hkv, D] for the query rows `items` covers; writes `out`.

    Give `ring_size` (sliding rings) or `block_size` (paged global pool). `k_store=None` needs `derived_key`.
    """
    tokens, q_heads, kv_heads, head_dim = check_attention_args(
        q, v_store, k_store, derived_key, ring_size, block_size
    )
    out = torch.empty_like(q) if out is None else out
    if len(items) == 0 or tokens == 0:
        return out
    if num_splits > 1 and items.block_q != 1:
        raise ValueError("splitting keys is for decode items (block_q == 1)")
    group = q_heads // kv_heads
    decode = items.block_q == 1
    fmt = kv_format(v_store)
    cfg = config or select_config(
        head_dim, group, decode=decode, fp8=fmt.code in (1, 2), capability=kernel_capability(q.device)
    )
    if cfg.block_m < items.block_q * next_pow2(group):
        raise ValueError(f"block_m {cfg.block_m} cannot hold {items.block_q} tokens x {group} heads")
    ops = pool_operands(q, v_store, k_store, derived_key)
    v_view, k_view, unit, native_fp8 = ops.v_view, ops.k_view, ops.unit, ops.native_fp8
    part_acc = part_lse = out
    if num_splits > 1:
        part_acc = torch.empty(
            len(items), q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(len(items), q_heads, num_splits, dtype=torch.float32, device=q.device)
    table = batch.block_table
    _paged_attention_kernel[(len(items), kv_heads, num_splits)](
        q, out, part_acc, part_lse, k_view, v_view, float(k_scale) * unit, float(v_scale) * unit, ops.knorm, ops.inv_freq,
        items.seq, items.q0, batch.seq_start, batch.seq_len, batch.seq_offset, table, batch.ring,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_view.stride(0), k_view.stride(1), v_view.stride(0), v_view.stride(1), table.stride(0),
        window or 0, ring_size or 1, block_size or 1, q_heads, tokens, num_splits,
        GROUP=group, GROUP_P2=next_pow2(group), BLOCK_Q=items.block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        D=head_dim, ROT=ops.rot, RING=ring_size is not None, SLIDING=window is not None,
        DERIVE_K=derived_key is not None, KV_FORMAT=fmt.code, NATIVE_FP8=native_fp8,
        COMPUTE=dot_dtype_code(q.dtype, fmt.code), SPLIT=num_splits > 1,
        PRECISION="ieee" if dot_dtype_code(q.dtype, fmt.code) == 0 else None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(q.device),
        **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(len(items), q_heads)](
            part_acc, part_lse, out, items.seq, items.q0, batch.seq_start, batch.seq_len, batch.seq_offset,
            out.stride(0), out.stride(1), window or 0, q_heads, tokens, num_splits,
            CHUNK=merge_chunk(num_splits), D=head_dim, BLOCK_N=cfg.block_n, SLIDING=window is not None,
            num_warps=4, **pdl_args(q.device),
        )  # fmt: skip
    return out
