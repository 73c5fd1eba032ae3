"""The vocabulary-wide ops after the lm_head: logit softcapping, and the greedy pick with its logprob.

Both read a [B, V] table of 262,144 columns a row for Gemma 4, so their cost is bytes, not math. In torch the
softcap is four passes (the fp32 cast, / cap, tanh, * cap; the decode graph then copied the result into its
output buffer) and the greedy pick four more (argmax, gather, and logsumexp's max and sum): about 0.3 ms of a
batch-96 decode step on an H100. Here:
  * `softcap_logits`: one pass, the matmul's bf16 logits in, cap * tanh(x / cap) in fp32 out (into the
    caller's buffer, e.g. the decode graph's logits);
  * `greedy_table`: two launches, each row split over `SPLITS` programs that keep a running max, its first
    index and the sum of exp(x - max), then one program a row that merges the splits into the argmax and its
    logprob (-log of the merged sum: the chosen logit is the max).
torch.argmax's rule holds: on ties the first index wins. No host syncs: both replay inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs

SOFTCAP_BLOCK = 2048
SPLITS = 32  # programs a row in the greedy pass: ~8K columns each for Gemma 4, enough programs at batch 1
PICK_BLOCK = 1024


@triton.jit
def _tanh(z):
    """tanh with exp of -2|z| only (no overflow), as geglu.gelu_tanh."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _softcap_kernel(in_ptr, out_ptr, V, stride_in, stride_out, cap, CAPPED: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < V
    x = tl.load(in_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    if CAPPED:
        x = cap * _tanh(x / cap)
    tl.store(out_ptr + row * stride_out + cols, x, mask=ok)


def softcap_logits(
    logits: torch.Tensor, cap: float | None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 cap * tanh(logits / cap) of [B, V] logits (any float dtype; no cap: the fp32 copy), into `out` when
    given (fp32 [B, V], any row stride)."""
    if logits.dim() != 2:
        raise ValueError(f"softcap_logits takes [B, V] logits, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    elif out.shape != logits.shape or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(
            f"out must be fp32 {tuple(logits.shape)} with unit column stride, got {out.dtype} {out.shape}"
        )
    if rows and vocab:
        _softcap_kernel[(rows, triton.cdiv(vocab, SOFTCAP_BLOCK))](
            logits, out, vocab, logits.stride(0), out.stride(0), float(cap or 1.0), CAPPED=bool(cap),
            BLOCK=SOFTCAP_BLOCK, num_warps=8, **pdl_args(out.device),
        )  # fmt: skip
    return out


@triton.jit
def _above(x):
    """x with -inf raised to -3e38: differences of two stay finite (-inf - -inf would be nan), exp of a
    difference from a finite max still underflows to 0, and lanes that saw only -inf hold a zero sum anyway."""
    return tl.maximum(x, -3.0e38)


@triton.jit
def _greedy_split_kernel(logits_ptr, part_ptr, index_ptr, V, stride, span, SPLITS: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Split s of row r, columns [s * span, (s + 1) * span): part[r, s] = (max, sum of exp(x - max)),
    index[r, s] = the max's first column."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    first = split * span
    stop = tl.minimum(first + span, V)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.full([BLOCK], 2**31 - 1, tl.int32)
    total = tl.zeros([BLOCK], tl.float32)  # per lane: sum of exp(x - best) over the lane's columns
    for c0 in range(first, stop, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride + cols, mask=cols < stop, other=float("-inf"))
        higher = x > best
        new_best = tl.maximum(best, x)
        keep = tl.exp(_above(best) - _above(new_best))
        add = tl.exp(_above(x) - _above(new_best))
        total = total * keep + add
        where = tl.where(higher, cols, where)  # a lane's columns rise: a strictly higher value is a later one
        best = new_best
    top = tl.max(best, axis=0)
    index = tl.min(tl.where(best == top, where, 2**31 - 1), axis=0)
    scale = tl.exp(_above(best) - _above(top))
    slot = row * SPLITS + split
    tl.store(part_ptr + slot * 2, top)
    tl.store(part_ptr + slot * 2 + 1, tl.sum(total * scale, axis=0))
    tl.store(index_ptr + slot, index)


@triton.jit
def _greedy_merge_kernel(part_ptr, index_ptr, table_ptr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Row r's splits -> table[r] = (token, its logprob) in float64, the layout of batch_sampler.greedy_table."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    slot = row * SPLITS + tl.arange(0, SPLITS)
    best = tl.load(part_ptr + slot * 2)
    total = tl.load(part_ptr + slot * 2 + 1)
    where = tl.load(index_ptr + slot)
    top = tl.max(best, axis=0)
    index = tl.min(tl.where(best == top, where, 2**31 - 1), axis=0)  # splits in column order: the first wins
    index = tl.where(index == 2**31 - 1, 0, index)  # a row of -inf only: column 0, as torch.argmax
    merged = tl.sum(total * tl.exp(_above(best) - _above(top)), axis=0)
    tl.store(table_ptr + row * 2, index.to(tl.float64))
    tl.store(table_ptr + row * 2 + 1, -tl.log(merged.to(tl.float64)))


def greedy_table(logits: torch.Tensor) -> torch.Tensor:
    """Argmax and its logprob per row of fp32 logits [B, V] as float64 [B, 2] (`batch_sampler.greedy_table`)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"greedy_table takes fp32 [B, V] logits, got {logits.dtype} {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    table = torch.empty((rows, 2), dtype=torch.float64, device=logits.device)
    if rows == 0 or vocab == 0:
        return table.fill_(float("nan"))
    span = triton.cdiv(triton.cdiv(vocab, SPLITS), PICK_BLOCK) * PICK_BLOCK
    part = torch.empty((rows, SPLITS, 2), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, SPLITS), dtype=torch.int32, device=logits.device)
    _greedy_split_kernel[(rows, SPLITS)](
        logits, part, index, vocab, logits.stride(0), span, SPLITS=SPLITS, BLOCK=PICK_BLOCK, num_warps=4,
        **pdl_args(logits.device),
    )  # fmt: skip
    _greedy_merge_kernel[(rows,)](part, index, table, SPLITS=SPLITS, num_warps=1, **pdl_args(logits.device))
    return table
