"""Flash attention for prefill chunks over the engine's KV pools (paged global blocks or sliding rings), in Triton.

The queries of a chunk attend to every cached key of their sequence (earlier chunks included), read from the pool
in its storage dtype. A program takes one query tile (BLOCK_Q tokens of one sequence x the GROUP query heads that
share a KV head, so each K/V tile serves all of them) and, for head dims too wide to keep one fp32 accumulator in
registers (512), one slice of DV output columns: the scores are computed in full by each slice's program, the
P @ V product only for its columns.

What makes it faster than the decode-shaped kernel in `paged_attention.py` on long prompts:
- tiles sized per head dim (64-128 query rows, 32-64 keys), the softmax in base 2 (exp2) with the scale folded in;
- masks only where a tile can hold a masked key: the causal diagonal and, on sliding layers, the window's lower
  edge; every other tile runs without a `where`;
- causal tiles skipped (keys stop at the tile's last query) and, on sliding layers, keys before the window never
  visited: a sliding layer costs the same per token at any prompt length;
- the tiles with the most keys (the chunk's last query tiles) start first, so the last wave is short.

Scores and K derivation for k_eq_v layers follow `paged_attention.py` (K = rope(V * w_k), with k_norm's weight folded
into q and two small dots over the rotated columns), or, for long eager steps, read the rotated columns from a
scratch written once a layer (`rotated_keys.py`); FP8 pools are read as fp16 with the scales applied to scores
and output. Nothing here is Hopper-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.attention_launch import next_pow2
from nvfp4kit.kernels.attention_metadata import AttentionBatch, WorkItems
from nvfp4kit.kernels.attention_pools import (
    DerivedKey,
    check_attention_args,
    derived_key_queries,
    dot_dtype_code,
    load_kv_tile,
    pool_operands,
    rotated_key_scores,
)
from nvfp4kit.kernels.configs import interpreting, kernel_capability, timed_tiles_fit
from nvfp4kit.kernels.kv_write import kv_format
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.rotated_keys import RotatedKeys

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    block_q: int  # query tokens per program (rows = block_q x the GQA group, padded to a power of two)
    block_n: int  # keys per tile
    dv_splits: int  # programs that share a query tile, each computing head_dim / dv_splits output columns
    num_warps: int
    num_stages: int


def prefill_block_q(head_dim: int, group: int) -> int:
    """Query tokens per program: 128 rows (tokens x padded GQA group) up to head dim 256, 64 rows beyond, so the
    fp32 accumulator stays at <= 128 registers a thread with 8 warps (16 rows in the CPU interpreter)."""
    rows = 16 if interpreting() else (128 if head_dim <= 256 else 64)
    return max(1, rows // next_pow2(group))


def prefill_configs(
    head_dim: int, group: int, capability: tuple[int, int] | None = None
) -> list[PrefillConfig]:
    """Tiles to try in order, all of `prefill_block_q` tokens (a tile that does not fit the card's shared memory
    is skipped from its first launch on). Data-center Hopper and Blackwell (sm_90, sm_100: 227 KB a block): the
    fastest of the H200 sweep first (docs/benchmarks.md, "Prefill attention"; `nvfp4kit bench attention
    --sweep`), then tiles that fit a 99 KB block.

    Every other card starts from the tiles that spill least when compiled for it (`nvfp4kit bench compile`):
    the H200's first tiles spill registers on the A100 (0.8 KB a thread at head dim 256, 5.6 KB at 512) and do
    not fit the 99 KB of sm_86/89/120 (RTX 3090/4090/5090, L4, L40S); 8 warps, 16-32 keys spill 8-150 B at head
    dim 256 and 32-890 B at 512 there, where 4 warps spill 0.6-5 KB. Untimed on those cards (none lent)."""
    block_q = prefill_block_q(head_dim, group)
    if interpreting():
        return [PrefillConfig(block_q, 16, 1, num_warps=4, num_stages=1)]
    datacenter = timed_tiles_fit(capability)
    if head_dim >= 512:  # H200 at 16K: 64 keys, one slice 71 TFLOP/s; 32 keys 58; two slices 43
        tiles = [(64, 1, 8, 2), (32, 1, 8, 2), (32, 2, 8, 2)] if datacenter else []
        tiles += [
            (16, 2, 8, 1),
            (16, 2, 8, 2),
            (16, 2, 4, 1),
            (16, 4, 4, 1),
        ]  # 1 stage: fits sm_89/120 FP8 too
    else:  # H200, head dim 256: 64 keys 153 TFLOP/s, 128 keys 149, 32 keys 129
        tiles = [(64, 1, 8, 2), (32, 1, 8, 2)] if datacenter else []
        tiles += [(32, 1, 8, 1), (16, 1, 8, 2), (32, 1, 4, 1), (16, 1, 4, 1)]
    return [PrefillConfig(block_q, bn, dv, num_warps=w, num_stages=st) for bn, dv, w, st in tiles]


def prefill_config(head_dim: int, group: int, capability: tuple[int, int] | None = None) -> PrefillConfig:
    """The first-choice tiles for a layer shape on a card of `capability` (see `prefill_configs`)."""
    return prefill_configs(head_dim, group, capability)[0]


# per-step values are plain runtime arguments (no variant per step shape): the metadata rows (slices at 4 x count
# bytes; only scalars and a gather come from them), the block-table width and the number of query tiles
@triton.jit(
    do_not_specialize=["limit_ptr", "item_seq_ptr", "item_q0_ptr", "seq_start_ptr", "seq_len_ptr", "seq_offset_ptr",
                       "block_table_ptr", "ring_ptr", "rot_first_ptr", "stride_bt", "num_items"]
)  # fmt: skip
def _prefill_attention_kernel(
    q_ptr, out_ptr, k_ptr, v_ptr, k_factor, v_factor, knorm_ptr, inv_freq_ptr, limit_ptr,
    item_seq_ptr, item_q0_ptr, seq_start_ptr, seq_len_ptr, seq_offset_ptr, block_table_ptr, ring_ptr, rot_ptr,
    rot_first_ptr, stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_rs, stride_rh, stride_bt,
    window, ring_size, block_size, num_items, kv_heads,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, DV_SPLITS: tl.constexpr, ROT: tl.constexpr,
    RING: tl.constexpr, SLIDING: tl.constexpr, DERIVE_K: tl.constexpr, PREROTATED: tl.constexpr, KV_FORMAT: tl.constexpr,
    NATIVE_FP8: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, BIDIR: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    pid = tl.program_id(0)
    per_item = kv_heads * DV_SPLITS
    item = num_items - 1 - pid // per_item  # items run latest-first: the tiles with the most keys lead
    kv_head = (pid % per_item) // DV_SPLITS
    dv = pid % DV_SPLITS
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
    row_ok = (g < GROUP) & (tok < qlen)
    head = kv_head * GROUP + g
    q_pos = start + tok
    q_rows = (qoff + tok).to(tl.int64) * stride_qt + head * stride_qh

    q_first = start + q0
    hi = start + tl.minimum(qlen, q0 + BLOCK_Q)  # keys [lo, hi): causal end of the tile's last query
    q_lim = q_pos  # the last key position each query row sees
    if BIDIR:  # image tokens also see the later tokens of their image
        q_lim = tl.load(limit_ptr + qoff + tok, mask=row_ok, other=0)
        hi = tl.maximum(hi, tl.max(tl.where(row_ok, q_lim + 1, 0), 0))
    lo = 0
    if SLIDING:
        lo = tl.maximum(q_first - window + 1, 0)

    cols = tl.arange(0, D)
    ocols = dv * DV + tl.arange(0, DV)
    q = tl.load(q_ptr + q_rows[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if DERIVE_K:
        q, q_r1, q_r2, w_r1, w_r2, freq = derived_key_queries(
            q, q_ptr, q_rows, row_ok, knorm_ptr, inv_freq_ptr, D, ROT, ct
        )
        qk_scale = v_factor * 1.4426950408889634
        # pre-rotated keys: q's rotated columns (raw: w_k is in the scratch's K) meet the scratch's K tile
        if PREROTATED:
            rc = tl.arange(0, 2 * ROT)
            q_rc = tl.where(rc < ROT, rc, D // 2 - ROT + rc)
            q_rot = tl.load(q_ptr + q_rows[:, None] + q_rc[None, :], mask=row_ok[:, None], other=0.0).to(ct)
            rot_rows = rot_ptr + tl.load(rot_first_ptr + seq).to(tl.int64) * stride_rs + kv_head * stride_rh
    else:
        q = q.to(ct)
        qk_scale = k_factor * 1.4426950408889634
    if RING:
        ring_base = tl.load(ring_ptr + seq).to(tl.int64) * ring_size

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        if RING:
            slot = ring_base + k_pos % ring_size
        else:
            blk = tl.load(block_table_ptr + seq * stride_bt + k_pos // block_size, mask=k_ok, other=0)
            slot = blk.to(tl.int64) * block_size + k_pos % block_size
        v_rows = v_ptr + slot * stride_vs + kv_head * stride_vh
        if DERIVE_K:
            v = load_kv_tile(v_rows[:, None] + cols[None, :], k_ok[:, None], KV_FORMAT, NATIVE_FP8, ct)
            if PREROTATED:  # one accumulator through both dots
                k_rot = tl.load(rot_rows + k_pos.to(tl.int64)[:, None] * stride_rs + rc[None, :], mask=k_ok[:, None],
                                other=0.0)  # fmt: skip
                scores = tl.dot(q_rot, tl.trans(k_rot), input_precision=PRECISION)
                scores = tl.dot(q, tl.trans(v), scores, input_precision=PRECISION)
            else:
                scores = tl.dot(q, tl.trans(v), input_precision=PRECISION)
                scores += rotated_key_scores(
                    q_r1, q_r2, w_r1, w_r2, freq, v_rows, k_ok, k_pos, D, ROT, KV_FORMAT, NATIVE_FP8, ct, PRECISION,
                )  # fmt: skip
            if DV_SPLITS > 1:
                v = load_kv_tile(v_rows[:, None] + ocols[None, :], k_ok[:, None], KV_FORMAT, NATIVE_FP8, ct)
        else:
            k_rows = k_ptr + slot * stride_ks + kv_head * stride_kh
            kt = load_kv_tile(k_rows[:, None] + cols[None, :], k_ok[:, None], KV_FORMAT, NATIVE_FP8, ct)
            scores = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
            v = load_kv_tile(v_rows[:, None] + ocols[None, :], k_ok[:, None], KV_FORMAT, NATIVE_FP8, ct)
        qk = scores * qk_scale
        # only tiles on the causal diagonal (or past the end) and at the window's lower edge hold masked keys
        edge = n0 + BLOCK_N - 1 > q_first
        if SLIDING:
            edge = edge | (n0 <= hi - 1 - window)
        if edge:
            keep = k_ok[None, :] & (k_pos[None, :] <= q_lim[:, None])
            if SLIDING:
                keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(ct), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc * (v_factor / tl.where(l_i > 0, l_i, 1.0))[:, None]
    out_rows = (qoff + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + out_rows[:, None] + ocols[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
    )


def prefill_attention(
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
    key_limit: torch.Tensor | None = None,
    rotated_keys: RotatedKeys | None = None,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal (and, with `window`, sliding) attention of the prefill query tiles `items` over a KV pool.

    q [T, Hq, D]; the pool [rows, Hkv, D] is a sliding ring (`ring_size`) or paged (`block_size`); `k_store=None`
    needs `derived_key`. `key_limit` [T] int32: the last key position each query token sees (>= its own position;
    image tokens see their whole image), default causal. `rotated_keys`: derived K's rotated columns computed
    beforehand for the items' sequences (`rotated_keys.rotate_derived_keys`, paged pools), instead of in every
    program. `items.block_q` must equal `config.block_q` (default `prefill_config(D, Hq // Hkv)`). Writes the rows
    of the items' tokens into `out` and returns it.
    """
    tokens, q_heads, kv_heads, head_dim = check_attention_args(
        q, v_store, k_store, derived_key, ring_size, block_size
    )
    group = q_heads // kv_heads
    configs = (
        [config] if config is not None else prefill_configs(head_dim, group, kernel_capability(q.device))
    )
    for cfg in configs:
        if items.block_q != cfg.block_q:
            raise ValueError(f"work items of {items.block_q} tokens, but the config tiles {cfg.block_q}")
        if head_dim % cfg.dv_splits:
            raise ValueError(f"head_dim {head_dim} does not split into {cfg.dv_splits} column slices")
    if key_limit is not None and (key_limit.shape != (tokens,) or key_limit.dtype != torch.int32):
        raise ValueError(
            f"key_limit must be int32 of shape ({tokens},), got {key_limit.dtype} {tuple(key_limit.shape)}"
        )
    if rotated_keys is not None and (derived_key is None or block_size is None):
        raise ValueError("rotated_keys go with derived_key on a paged pool (block_size)")
    out = torch.empty_like(q) if out is None else out
    if len(items) == 0 or tokens == 0:
        return out
    fmt = kv_format(v_store)
    ops = pool_operands(q, v_store, k_store, derived_key)
    v_view, k_view, unit = ops.v_view, ops.k_view, ops.unit
    compute = dot_dtype_code(q.dtype, fmt.code)
    table = batch.block_table
    rot = rotated_keys.values if rotated_keys is not None else q
    rot_first = rotated_keys.first_row if rotated_keys is not None else items.seq
    args = (
        q, out, k_view, v_view, float(k_scale) * unit, float(v_scale) * unit, ops.knorm, ops.inv_freq,
        items.seq if key_limit is None else key_limit, items.seq, items.q0, batch.seq_start, batch.seq_len,
        batch.seq_offset, table, batch.ring, rot, rot_first, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_view.stride(0), k_view.stride(1), v_view.stride(0), v_view.stride(1), rot.stride(0), rot.stride(1),
        table.stride(0),
        window or 0, ring_size or 1, block_size or 1, len(items), kv_heads,
    )  # fmt: skip
    constants = dict(
        GROUP=group, GROUP_P2=next_pow2(group), D=head_dim, ROT=ops.rot, RING=ring_size is not None,
        SLIDING=window is not None, DERIVE_K=derived_key is not None, PREROTATED=rotated_keys is not None,
        KV_FORMAT=fmt.code, NATIVE_FP8=ops.native_fp8,
        COMPUTE=compute, PRECISION="ieee" if compute == 0 else None, BIDIR=key_limit is not None,
    )  # fmt: skip
    shape_key = (
        str(q.device),
        kernel_capability(q.device),
        head_dim,
        group,
        derived_key is not None,
        rotated_keys is not None,
        fmt.code,
    )
    fitting = [c for c in configs if (shape_key, c) not in _TOO_BIG] or configs[-1:]
    for cfg in fitting:
        try:
            _prefill_attention_kernel[(len(items) * kv_heads * cfg.dv_splits,)](
                *args, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, DV=head_dim // cfg.dv_splits,
                DV_SPLITS=cfg.dv_splits, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **constants, **pdl_args(q.device),
            )  # fmt: skip
            return out
        except triton.runtime.errors.OutOfResources:  # too big for this card's shared memory: the next tile
            if cfg is fitting[-1]:
                raise
            _TOO_BIG.add((shape_key, cfg))
    return out


# (device, layer shape, tiles) that did not fit their card; skipped from then on
_TOO_BIG: set[tuple] = set()


def forget_oversized_tiles() -> None:
    """Try every tile again from the first (`bench compile` checks each card as a fresh process would)."""
    _TOO_BIG.clear()
