"""Dense W4A16 linear: y = x @ dequant(W)^T with BF16/FP16 activations, NVFP4 weights, fp32 accumulation.

Two kernels, chosen by M (see `configs.py`):
  * `gemv` (decode, tiny M): each program streams a [BLOCK_N, K-slice] of W and multiply-adds on the CUDA
    cores into a [BM, BN, BK] fp32 accumulator that is reduced once at the end; split-K spreads short
    matrices over the whole GPU.
  * `dot` (everything else): tensor-core tiles (`tl.dot`), grouped program order for L2 reuse, optional
    split-K, optional swapped operands (W as the left operand so a 64-row weight tile feeds the MMA).
At prefill sizes (M >= `DEQUANT_MIN_M`, no explicit config) neither kernel runs: the weight is expanded into a
BF16 scratch copy and cuBLAS does the product (`dequant.py`; measured faster than the Triton mainloop).
Split-K partials go to an fp32 workspace sized by (M, N, split); the last program to finish a tile (a
per-tile arrival counter) sums them and writes the output, so split-K costs no second launch. Counters are
left at zero after every call, and nothing syncs with the host, so the op replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels import thresholds
from nvfp4kit.kernels.configs import LinearConfig, heuristic_linear, interpreting, select_linear_config
from nvfp4kit.kernels.dequant import dequant_linear
from nvfp4kit.kernels.gemv_mma import gemv_mma, gemv_mma_supported
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.nvfp4_tile import (
    fold_scale,
    load_act_halves,
    load_act_tile,
    load_weight_halves,
    load_weight_tile,
    mma,
)
from nvfp4kit.kernels.split_k import arrival_counters
from nvfp4kit.kernels.thresholds import DEQUANT_MIN_M


@triton.jit(do_not_specialize=["M"])  # the token count varies by step: no variant per class of it
def _w4a16_dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    ws_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    HALVES: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    # grouped order: GROUP_M row-blocks share each weight tile while it is hot in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    rn_load = rn % N  # wrapped rows keep weight loads unmasked; their results are never stored
    dtype = x_ptr.dtype.element_ty
    if SWAP_AB:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        if HALVES:  # even and odd K columns apart: two MMAs, no nibble interleave (nvfp4_tile.py)
            xe, xo = load_act_halves(x_ptr, rm, m_ok, k0, K, stride_xm, BK, EVEN_K)
            we, wo = load_weight_halves(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, dtype
            )
            if SWAP_AB:
                acc = mma(mma(acc, we, tl.trans(xe), INTERPRET), wo, tl.trans(xo), INTERPRET)
            else:
                acc = mma(mma(acc, xe, tl.trans(we), INTERPRET), xo, tl.trans(wo), INTERPRET)
        else:
            x = load_act_tile(x_ptr, rm, m_ok, k0, K, stride_xm, BK, EVEN_K)
            w = load_weight_tile(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, dtype
            )
            if SWAP_AB:
                acc = mma(acc, w, tl.trans(x), INTERPRET)
            else:
                acc = mma(acc, x, tl.trans(w), INTERPRET)
    if SWAP_AB:
        acc = tl.trans(acc)
    _write_output(
        acc,
        out_ptr,
        ws_ptr,
        counter_ptr,
        s2_ptr,
        rm,
        rn,
        M,
        N,
        stride_om,
        pid_m * grid_n + pid_n,
        pid_k,
        SPLIT_K,
        ASM,
    )


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    ws_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    HALVES: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    rn_load = rn % N
    if HALVES:  # low nibbles times even K, high nibbles times odd K: no interleave of the decoded weights
        acc = tl.zeros([BM, BN, BK // 2], dtype=tl.float32)
        for k0 in range(pid_k * BK, K, BK * SPLIT_K):
            xe, xo = load_act_halves(x_ptr, rm, m_ok, k0, K, stride_xm, BK, EVEN_K)
            we, wo = load_weight_halves(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, tl.float32
            )
            acc += (
                we[None, :, :] * xe.to(tl.float32)[:, None, :]
                + wo[None, :, :] * xo.to(tl.float32)[:, None, :]
            )
    else:
        acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
        for k0 in range(pid_k * BK, K, BK * SPLIT_K):
            x = load_act_tile(x_ptr, rm, m_ok, k0, K, stride_xm, BK, EVEN_K).to(tl.float32)
            w = load_weight_tile(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, tl.float32
            )
            acc += w[None, :, :] * x[:, None, :]
    y = tl.sum(acc, axis=2)
    _write_output(
        y, out_ptr, ws_ptr, counter_ptr, s2_ptr, rm, rn, M, N, stride_om, pid_n, pid_k, SPLIT_K, ASM
    )


@triton.jit
def _write_output(
    acc,
    out_ptr,
    ws_ptr,
    counter_ptr,
    s2_ptr,
    rm,
    rn,
    M,
    N,
    stride_om,
    tile,
    pid_k,
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,
):
    """Scale and store the tile; with split-K, park the partial and let the last arriving program reduce."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, (acc * fold_scale(s2_ptr, 0, True, ASM)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        offs = rm[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the arrival is counted
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for split in tl.static_range(SPLIT_K):  # split order, whoever arrived last: deterministic sums
                total += tl.load(ws_ptr + split * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(
                out_ptrs, (total * fold_scale(s2_ptr, 0, True, ASM)).to(out_ptr.dtype.element_ty), mask=mask
            )
            tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next call (and graph replay)


def _check_linear_args(x: torch.Tensor, weight: NVFP4Tensor) -> tuple[int, int]:
    if weight.packed.dim() != 2:
        raise ValueError(f"w4a16_linear takes a 2-D NVFP4 weight, got shape {weight.shape}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"activation has {x.shape[-1]} features, weight expects {k} (weight shape {(n, k)})")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"w4a16_linear supports bf16/fp16/fp32 activations, got {x.dtype}")
    if weight.scale_2.numel() != 1:
        raise ValueError(f"a 2-D NVFP4 weight needs one scale_2, got {weight.scale_2.numel()}")
    return n, k


def w4a16_linear(
    x: torch.Tensor,
    weight: NVFP4Tensor,
    *,
    config: LinearConfig | None = None,
    dequant_min_m: int = DEQUANT_MIN_M,
) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K])^T -> [..., N] in x.dtype.

    Without a `config`, M >= `thresholds.LINEAR_COPY_MIN_M` reads the weight's kept BF16 copy where it has one
    (bf16 activations), M >= `dequant_min_m` takes the dequantize-then-cuBLAS path; a config forces Triton."""
    n, k = _check_linear_args(x, weight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kept = weight.__dict__.get("_dense")  # a BF16 copy kept for many-token steps (thresholds.py)
    if config is None and kept is not None and kept.dtype == x.dtype == torch.bfloat16:
        if m >= thresholds.LINEAR_COPY_MIN_M:  # read at call time: benchmarks move it
            return F.linear(x2, kept).reshape(*lead, n)
    # fp16 keeps the Triton path: a weight expanded with scale_2 folded in could flush to fp16 subnormals
    if config is None and m >= max(1, dequant_min_m) and x.dtype != torch.float16:
        return dequant_linear(x2, weight).reshape(*lead, n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    cfg = config or select_linear_config(m, n, k, device=x.device)
    if cfg.kernel == "frag":
        if gemv_mma_supported(x2, weight):
            out = gemv_mma(x2, weight, k_warps=cfg.num_warps, unroll=cfg.unroll, row_groups=cfg.block_n // 8)
            return out.reshape(*lead, n)
        cfg = heuristic_linear(m, n, k, device=x.device)  # fp16, or a weight the fragment GEMV does not take
    interpret = interpreting()
    asm = 0  # the decoder: 0 bits, 1 PTX, 2 PTX with normal block scales (nvfp4_tile.py)
    if cfg.decode == "asm" and not interpret and x.dtype != torch.float16:  # PTX output is bf16-scaled
        asm = 2 if weight.normal_scales() else 1
    packed, scale, s2 = weight.kernel_operands()
    even_k = k % cfg.block_k == 0
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    if split > 1:
        workspace = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        counters = arrival_counters(x.device, tiles)
    else:
        workspace = counters = out  # unused
    common = (
        x2,
        packed,
        scale,
        s2,
        out,
        workspace,
        counters,
        m,
        n,
        k,
        x2.stride(0),
        packed.stride(0),
        scale.stride(0),
        out.stride(0),
    )
    if cfg.kernel == "gemv":
        if m > cfg.block_m:
            raise ValueError(f"gemv config handles M <= {cfg.block_m}, got M={m}")
        grid = (triton.cdiv(n, cfg.block_n), split)
        _w4a16_gemv_kernel[grid](
            *common,
            BM=cfg.block_m,
            BN=cfg.block_n,
            BK=cfg.block_k,
            SPLIT_K=split,
            ASM=asm,
            EVEN_K=even_k,
            HALVES=cfg.halves,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **pdl_args(x.device),
        )
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _w4a16_dot_kernel[grid](
            *common,
            BM=cfg.block_m,
            BN=cfg.block_n,
            BK=cfg.block_k,
            SPLIT_K=split,
            GROUP_M=cfg.group_m,
            SWAP_AB=cfg.swap_ab,
            ASM=asm,
            EVEN_K=even_k,
            HALVES=cfg.halves,
            INTERPRET=interpret,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **pdl_args(x.device),
        )
    return out.reshape(*lead, n)
