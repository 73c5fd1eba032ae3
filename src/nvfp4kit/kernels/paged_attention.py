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

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.attention_launch import (
    AttentionConfig,
    merge_chunk,
    next_pow2,
    select_config,
)
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.attention_pools import (
    DerivedKey,
    check_attention_args,
    derived_key_queries,
    dot_dtype_code,
    load_kv_tile,
    load_kv_tile_unmasked,
    pool_operands,
    rotated_key_scores,
)
from nvfp4kit.kernels.configs import kernel_capability
from nvfp4kit.kernels.kv_write import kv_format
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs

# the per-step metadata rows of both attention kernels: slices of one buffer at 4 x count bytes, so their 16-byte
# alignment changes with the step's sequence and item counts (only scalars are loaded from them: nothing to lose)
_STEP_POINTERS = ("item_seq_ptr", "item_q0_ptr", "seq_start_ptr", "seq_len_ptr", "seq_offset_ptr",
                  "block_table_ptr", "ring_ptr")  # fmt: skip


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
    NATIVE_FP8: tl.constexpr, COMPUTE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
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
    """One query head's output from its item's partials (weights exp(lse - max)); a padding item (its row at or
    past num_rows) stores nothing."""
    wait_for_inputs(PDL)
    item = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(item_seq_ptr + item)
    qoff = tl.load(seq_offset_ptr + seq)
    # the splits that held keys, as the attention kernel divided them: graphs are captured with the split count
    # of the longest context, so at a short one most splits are empty (and stored nothing)
    start, qlen, q0 = tl.load(seq_start_ptr + seq), tl.load(seq_len_ptr + seq), tl.load(item_q0_ptr + item)
    first_key = 0
    if SLIDING:
        first_key = tl.maximum(start + q0 - window + 1, 0)
    keys = tl.maximum(start + tl.minimum(qlen, q0 + 1) - first_key, 0)
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
    With key splits, a second launch merges the partials (merging in the attention kernel's last split, behind
    an arrival counter, was slower on the H100: batch 1 -5.5%, sessions 24 and 32).
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
