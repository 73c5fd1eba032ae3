"""Derived K's rotated columns, computed once per layer and step for long prefill chunks.

On k_eq_v layers K is rope(V * k_norm_weight), derived inside the attention kernels. The pass-through columns
cost nothing (k_norm's weight is folded into q), but the rotated ones (128 of 512 on Gemma 4's global layers)
need sin/cos and two fp32 [keys, 64] tiles per key tile, in every query tile's program: compiled for sm_90 the
prefill kernel then spills 496 bytes a thread, against none without them. A chunk of 8K queries reads each key
once per query tile (hundreds of times), so this module writes the rotated columns of every key of the step's
prefill sequences once, in the attention's dot dtype and storage units, and the prefill kernel reads them as a
plain [keys, 2 * rot] tile for one dot. The values are those the in-kernel path computes (the same helper,
`attention_pools.rotated_key_columns`), rounded to the dot dtype as that path rounds them.

Scratch rows: each prefill sequence's keys 0 .. start + length - 1 in a row range of its own (`first_row`), so
one launch serves a mixed batch. The engine uses it for eager steps with enough keys (`worth_prerotating`);
CUDA graphs and short chunks keep the in-kernel derivation. H100, 26B-A4B, 8K chunks, FP8 KV
(scripts/gpu_prerotate_ab.py): TTFT 16.62 -> 11.30 s at 128K, 1.55 -> 1.22 s at 32K; the 8K threshold itself
is a guess (no timing between 8K and 32K yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.attention_metadata import AttentionBatch
from nvfp4kit.kernels.attention_pools import DerivedKey, dot_dtype_code, pool_operands, rotated_key_columns
from nvfp4kit.kernels.kv_write import kv_format
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.thresholds import PREROTATE_MARGIN_BYTES, PREROTATE_MIN_KEYS

# Below PREROTATE_MIN_KEYS keys in a step's prefill sequences, the in-kernel derivation is kept (the scratch's
# write and the launch are not repaid); past the engine's scratch budget, too (`KVLayout.rotated_keys_budget`:
# the margin's PREROTATE_MARGIN_BYTES, 128K keys of 26B-A4B, or what the plan reserved for max_model_len keys)
_BLOCK_KEYS = 64
_DOT_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}


@dataclass(frozen=True)
class RotatedKeys:
    """rope(V * k_norm_weight)'s rotated columns for a step's prefill sequences."""

    values: torch.Tensor  # [rows, kv_heads, 2 * rot]: the pairs' first members, then their second members
    first_row: torch.Tensor  # [S] int32: the row of each sequence's key position 0 (-1: not computed)


def prefill_key_rows(starts: list[int], lengths: list[int]) -> tuple[list[int], int, int]:
    """Scratch rows of a step: (first row per sequence, -1 for those with at most one query token; total rows;
    most keys of one sequence). A prefill sequence's keys are its cached positions and this step's."""
    first, total, most = [], 0, 0
    for start, n in zip(starts, lengths):
        if n <= 1:
            first.append(-1)
            continue
        first.append(total)
        total += start + n
        most = max(most, start + n)
    return first, total, most


def worth_prerotating(
    q: torch.Tensor,
    v_store: torch.Tensor,
    derived_key: DerivedKey,
    total_rows: int,
    budget_bytes: int = PREROTATE_MARGIN_BYTES,
) -> bool:
    """Whether a step with `total_rows` prefill keys takes the pre-rotated path: enough keys to repay the
    scratch (`PREROTATE_MIN_KEYS`, read at call time) and a scratch within `budget_bytes`."""
    if total_rows < PREROTATE_MIN_KEYS:
        return False
    rot = pool_operands(q, v_store, None, derived_key).rot
    itemsize = rotated_keys_dtype(q.dtype, v_store).itemsize
    return total_rows * v_store.shape[1] * 2 * rot * itemsize <= budget_bytes


def rotated_keys_dtype(q_dtype: torch.dtype, v_store: torch.Tensor) -> torch.dtype:
    """The attention kernels' dot dtype for this pool (the scratch's dtype)."""
    return _DOT_DTYPES[dot_dtype_code(q_dtype, kv_format(v_store).code)]


@triton.jit(
    do_not_specialize=["first_row_ptr", "seq_start_ptr", "seq_len_ptr", "block_table_ptr", "stride_bt"]
)
def _rotate_keys_kernel(
    v_ptr, out_ptr, knorm_ptr, inv_freq_ptr, first_row_ptr, seq_start_ptr, seq_len_ptr, block_table_ptr,
    stride_vs, stride_vh, stride_os, stride_oh, stride_bt, block_size,
    D: tl.constexpr, ROT: tl.constexpr, BLOCK_N: tl.constexpr, KV_FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    seq = tl.program_id(0)
    first = tl.load(first_row_ptr + seq)
    keys = tl.load(seq_start_ptr + seq) + tl.load(seq_len_ptr + seq)
    n0 = tl.program_id(1) * BLOCK_N
    if (first >= 0) & (n0 < keys):
        kv_head = tl.program_id(2)
        half: tl.constexpr = D // 2
        rcols = tl.arange(0, ROT)
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < keys
        blk = tl.load(block_table_ptr + seq * stride_bt + k_pos // block_size, mask=k_ok, other=0)
        slot = blk.to(tl.int64) * block_size + k_pos % block_size
        v_rows = v_ptr + slot * stride_vs + kv_head * stride_vh
        w_r1 = tl.load(knorm_ptr + rcols).to(tl.float32)
        w_r2 = tl.load(knorm_ptr + half + rcols).to(tl.float32)
        freq = tl.load(inv_freq_ptr + rcols).to(tl.float32)
        k1, k2 = rotated_key_columns(
            v_rows, k_ok, k_pos, w_r1, w_r2, freq, D, ROT, KV_FORMAT, NATIVE_FP8,
            out_ptr.dtype.element_ty == tl.float32,
        )  # fmt: skip
        dst = (
            out_ptr
            + ((first + k_pos).to(tl.int64) * stride_os + kv_head * stride_oh)[:, None]
            + rcols[None, :]
        )
        tl.store(dst, k1.to(out_ptr.dtype.element_ty), mask=k_ok[:, None])
        tl.store(dst + ROT, k2.to(out_ptr.dtype.element_ty), mask=k_ok[:, None])


def rotate_derived_keys(
    q: torch.Tensor,
    v_store: torch.Tensor,
    derived_key: DerivedKey,
    batch: AttentionBatch,
    *,
    block_size: int,
    first_row: torch.Tensor,
    total_rows: int,
    max_keys: int,
) -> RotatedKeys:
    """The rotated key columns of the batch's sequences with `first_row >= 0` (a paged pool that stores V only;
    `q` [T, Hq, D] gives the dot dtype and the device). `total_rows`, `max_keys`: from `prefill_key_rows`."""
    if first_row.shape != batch.seq_start.shape or first_row.dtype != torch.int32:
        raise ValueError(f"first_row must be int32 of shape {tuple(batch.seq_start.shape)}")
    ops = pool_operands(q, v_store, None, derived_key)
    kv_heads, head_dim = v_store.shape[1], v_store.shape[2]
    dtype = rotated_keys_dtype(q.dtype, v_store)
    values = torch.empty((total_rows, kv_heads, 2 * ops.rot), dtype=dtype, device=q.device)
    if total_rows and max_keys:
        table = batch.block_table
        grid = (first_row.shape[0], triton.cdiv(max_keys, _BLOCK_KEYS), kv_heads)
        _rotate_keys_kernel[grid](
            ops.v_view, values, ops.knorm, ops.inv_freq, first_row, batch.seq_start, batch.seq_len, table,
            ops.v_view.stride(0), ops.v_view.stride(1), values.stride(0), values.stride(1), table.stride(0),
            block_size, D=head_dim, ROT=ops.rot, BLOCK_N=_BLOCK_KEYS, KV_FORMAT=kv_format(v_store).code,
            NATIVE_FP8=ops.native_fp8, num_warps=4, **pdl_args(q.device),
        )  # fmt: skip
    return RotatedKeys(values, first_row)
