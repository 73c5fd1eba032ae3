"""The dense MLP's gate_up projection and its GeGLU in one launch, for the one-token GEMV of a decode step.

At batch 1 a decode step is a chain of latency-bound launches (docs/benchmarks.md, session 15), so the GeGLU's own
launch is worth folding into the projection before it. Each program computes half the engine's GEMV tile
(`LinearConfig`, kernel "gemv", no K split) of gate rows and the same rows of up, so it loads and holds what one
GEMV program does (132 sm_90 registers; a full tile of each took 210 and made the H100 step 4% slower), and
writes gelu_tanh(gate) * up. The products are rounded to the activation dtype before the GeGLU, as the separate
launches round them, and each row's K sum has the GEMV's layout, so the result is bitwise that of
`w4a16_linear` followed by `geglu`. Other sizes and tiles keep the two launches (`fuses`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import LinearConfig, interpreting, select_linear_config
from nvfp4kit.kernels.geglu import geglu, gelu_tanh
from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs
from nvfp4kit.kernels.moe_frag import frag_gate_up_geglu, frag_geglu_supported
from nvfp4kit.kernels.nvfp4_tile import fold_scale, load_act_tile, load_weight_tile
from nvfp4kit.kernels.w4a16_linear import w4a16_linear

# Opt-in (NVFP4KIT_FUSED_GEGLU=1) until a GPU has timed this half-width tile: the full-width one was slower (H100,
# session 15: batch-1 step 3.727 vs 3.583 ms). A/B: scripts/gpu_decode_variants.py --variants 0:1:1:1:0 0:1:1:1:1
FUSE = os.environ.get("NVFP4KIT_FUSED_GEGLU", "0") == "1"


@triton.jit(do_not_specialize=["M"])
def _gate_up_geglu_gemv_kernel(
    x_ptr, w_ptr, s_ptr, s2_ptr, out_ptr, M, inter, K, stride_xm, stride_wn, stride_sn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    rm = tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    m_ok = rm < M
    gate_rows = rn % inter
    up_rows = gate_rows + inter
    acc_gate = tl.zeros([BM, BN, BK], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):  # the same products and sum order as `_w4a16_gemv_kernel`, twice
        x = load_act_tile(x_ptr, rm, m_ok, k0, K, stride_xm, BK, EVEN_K).to(tl.float32)
        gate = load_weight_tile(
            w_ptr, s_ptr, gate_rows, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, tl.float32
        )
        up = load_weight_tile(
            w_ptr, s_ptr, up_rows, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, tl.float32
        )
        acc_gate += gate[None, :, :] * x[:, None, :]
        acc_up += up[None, :, :] * x[:, None, :]
    scale = fold_scale(s2_ptr, 0, True, ASM)
    dtype = out_ptr.dtype.element_ty
    g = (tl.sum(acc_gate, axis=2) * scale).to(dtype).to(tl.float32)  # rounded as the projection's output is
    u = (tl.sum(acc_up, axis=2) * scale).to(dtype).to(tl.float32)
    mask = m_ok[:, None] & (rn[None, :] < inter)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], (gelu_tanh(g) * u).to(dtype), mask=mask)


def _fused_config(x: torch.Tensor, weight: object) -> LinearConfig | None:
    """The GEMV tile the one-launch path runs with, or None where the two launches run: an NVFP4 weight whose
    linear would run the GEMV without a K split (the tuned or heuristic tile for this M, in practice one token),
    bf16/fp32 activations."""
    if not FUSE or not isinstance(weight, NVFP4Tensor) or x.dtype == torch.float16 or x.dim() != 2:
        return None
    n, k = weight.shape
    if n % 2 or weight.scale_2.numel() != 1:
        return None
    cfg = select_linear_config(x.shape[0], n, k, device=x.device)
    fits = cfg.kernel == "gemv" and cfg.split_k == 1 and x.shape[0] <= cfg.block_m
    return cfg if fits else None


def fuses(x: torch.Tensor, weight: object) -> bool:
    """Whether `gate_up_geglu` runs one launch here (`_fused_config`)."""
    return _fused_config(x, weight) is not None


def gate_up_geglu(x: torch.Tensor, weight: NVFP4Tensor) -> torch.Tensor:
    """gelu_tanh(x @ gate^T) * (x @ up^T) for the fused weight [gate | up] ([2I, K]): [T, I] in x.dtype. One
    launch where `fuses` says so, else the projection and the GeGLU as two."""
    if isinstance(weight, NVFP4Tensor) and frag_geglu_supported(x, weight):
        frag = select_linear_config(x.shape[0], *weight.shape, device=x.device)
        if frag.kernel == "frag":  # the fragment GEMV's one-launch form (moe_frag.py)
            return frag_gate_up_geglu(x, weight, k_warps=frag.num_warps, unroll=frag.unroll)
    cfg = _fused_config(x, weight)
    if cfg is None:
        return geglu(w4a16_linear(x, weight))
    n, k = weight.shape
    inter = n // 2
    m = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    asm = 0  # the decoder, as w4a16_linear picks it: 0 bits, 1 PTX, 2 PTX with normal block scales
    if cfg.decode == "asm" and not interpreting():
        asm = 2 if weight.normal_scales() else 1
    packed, scale, s2 = weight.kernel_operands()
    # half the tile of gate rows and half of up rows: the GEMV program's bytes and registers (session 15)
    rows = max(1, cfg.block_n // 2)
    _gate_up_geglu_gemv_kernel[(triton.cdiv(inter, rows),)](
        x, packed, scale, s2, out, m, inter, k, x.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
        BM=cfg.block_m, BN=rows, BK=cfg.block_k, ASM=asm, EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )  # fmt: skip
    return out
