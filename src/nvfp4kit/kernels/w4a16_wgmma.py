"""Hopper W4A16 GEMM with the FP4 weights decoded straight into the wgmma register operand (Gluon, sm_90, GPU only).

Triton's `tl.dot` tiles either stage decoded weights through shared memory and wait for every wgmma (the decode
and the tensor cores take turns), or convert them into the register operand with byte loads from shared memory
(session 24, sm_90 SASS). Here the layout is ours: out^T = W @ x^T, the weight tile [BW rows, 64 K] is the MMA's
register operand (A) and the activations [BT tokens, 64 K] its shared-memory operand (B).

The K order inside each 64-wide chunk is permuted so that a thread's part of the A fragment comes from 8
consecutive packed bytes of one row (one 8-byte load, one E4M3 block scale): thread t (lane % 4) of a row loads
bytes 8t..8t+7 = K 16t..16t+15, decodes them (`_DECODE_PTX` of nvfp4_tile, low and high nibbles apart) and the
values land on fragment column p = 32 * nibble + 16 * s + 8 * h + 2 * t + j for byte 8t + 4s + 2h + j. A dot
product does not care about the order of K as long as both operands share it, so the activations are gathered
into that order first (`permute_activations`, one pass over x; a producer kernel could write them so).

Main loop: weights for chunk c + 1 are loaded while chunk c decodes; activations stream through a ring of
STAGES shared-memory tiles by cp.async; each wgmma is issued async and the next chunk's decode overlaps it (one
group in flight; the previous chunk's A registers are kept alive through the wait).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.nvfp4_tile import _DECODE_PTX

# cp.async into shared memory: `async_load` since Triton 3.7 (CI), `async_copy_global_to_shared` in 3.6 (the device's)
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed after 3.6 too

CHUNK = 64  # K values a main-loop step (32 packed bytes a row, four E4M3 block scales)


def k_permutation(k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Index i of the permuted order holds K column perm[i] (for `x[:, perm]`): inside each 64-wide chunk,
    position p = 32n + 16s + 8h + 2t + j holds K = 16t + 2(4s + 2h + j) + n."""
    if k % CHUNK:
        raise ValueError(f"K = {k} is not a multiple of {CHUNK}")
    p = torch.arange(CHUNK)
    n, s, h, t, j = p // 32, p // 16 % 2, p // 8 % 2, p // 2 % 4, p % 2
    within = 16 * t + 2 * (4 * s + 2 * h + j) + n
    chunks = torch.arange(0, k, CHUNK)[:, None]
    return (chunks + within[None, :]).reshape(-1).to(device)


def permute_activations(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [M, K] in the kernel's K order."""
    return x.index_select(1, perm)


@gluon.constexpr_function
def _row_bases(num_warps):
    """Warp bases of a [BW, ...] tile whose warp w holds rows 16w..16w+15 (the wgmma A fragment's rows)."""
    out = []
    w = 16
    while w < 16 * num_warps:
        out.append(w)
        w *= 2
    return out


@gluon.constexpr_function
def _byte_layout(num_warps, row_reps):
    """[BW, 4, 8] packed bytes: thread (warp, lane) holds rows 16w + lane // 4 and + 8 (and the same again every
    16 * num_warps rows, row_reps times), group t = lane % 4, its 8 bytes in registers (one 8-byte load)."""
    more = []
    r = 16 * num_warps
    while r < 16 * num_warps * row_reps:
        more.append([r, 0, 0])
        r *= 2
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]] + more,
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[r, 0, 0] for r in _row_bases(num_warps)],
        block_bases=[],
        shape=[16 * num_warps * row_reps, 4, 8],
    )


@gluon.jit
def _scale_operand(s, NORMAL: gl.constexpr):
    """E4M3 block-scale bytes -> bf16 * 2**64, the PTX decoder's scale operand (nvfp4_tile.scale_operand)."""
    su = s.to(gl.uint16)
    if NORMAL:
        scale = (((su & 0x7F) << 4) + (184 << 7)).to(gl.bfloat16, bitcast=True)
    else:
        normal = (((su & 0x7F) << 7) + (15 << 10)).to(gl.float16, bitcast=True)
        subnormal = (su & 0x07).to(gl.float16) * 0.25
        fp16 = gl.where((su & 0x78) == 0, subnormal, normal)
        scale = (fp16.to(gl.float32) * 144115188075855872.0).to(gl.bfloat16)  # * 2**57
    return scale


@gluon.jit
def _decode_chunk(b, s, a_layout: gl.constexpr, BW: gl.constexpr, NORMAL: gl.constexpr):
    """Packed bytes [BW, 4, 8] and their block scales [BW, 4] -> the A operand [BW, 64] in the permuted K order."""
    scale = gl.expand_dims(_scale_operand(s, NORMAL), 2)
    scale = gl.broadcast(scale, b)[0]
    lo, hi = gl.inline_asm_elementwise(
        _DECODE_PTX, "=r,=r,=r,=r,r,r,r", [scale, b], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4
    )
    v = gl.join(lo, hi)  # [BW, t, 8 bytes, nibble]
    v = gl.reshape(v, [BW, 4, 2, 2, 2, 2])  # [BW, t, s, h, j, n]
    v = gl.permute(v, (0, 5, 2, 3, 1, 4))  # [BW, n, s, h, t, j]
    return gl.convert_layout(gl.reshape(v, [BW, 64]), a_layout)


@gluon.jit
def _issue_chunk_copy(x_ptr, w_ptr, x_smem, w_smem, w_off, chunk, n_chunks, t0, M, stride_xm, STAGES: gl.constexpr,
                      BT: gl.constexpr, x_copy: gl.constexpr):  # fmt: skip
    """cp.async of chunk `chunk` (if it exists): its activations [BT, 64] and packed weight bytes [BW, 32] into
    ring slot chunk % STAGES; always one commit group, so that wait_group counts chunks."""
    rt = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, x_copy))
    rk = chunk * 64 + gl.arange(0, 64, layout=gl.SliceLayout(0, x_copy))
    ptrs = x_ptr + gl.expand_dims(rt, 1) * stride_xm + gl.expand_dims(rk, 0)
    ok = gl.expand_dims(rt < M, 1) & gl.expand_dims(rk < n_chunks * 64, 0)
    _cp_async(x_smem.index(chunk % STAGES), ptrs, mask=ok)
    live = gl.full(w_off.shape, chunk, gl.int32, layout=w_off.type.layout) < n_chunks
    _cp_async(w_smem.index(chunk % STAGES), w_ptr + w_off + chunk * 32, mask=live)
    async_copy.commit_group()


@gluon.jit
def _w4a16_wgmma_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    BT: gl.constexpr,
    STAGES: gl.constexpr,
    NORMAL: gl.constexpr,
    IN_FLIGHT: gl.constexpr,
    SPLIT_K: gl.constexpr,
    ROW_REPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    BW: gl.constexpr = (
        16 * num_warps * ROW_REPS
    )  # weight rows: each warpgroup issues ROW_REPS m64 MMAs a K step
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BT, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    byte_layout: gl.constexpr = _byte_layout(num_warps, ROW_REPS)
    scale_layout: gl.constexpr = gl.SliceLayout(2, byte_layout)
    x_copy: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    w_copy: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [num_warps, 1], [1, 0])
    x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, 64], gl.bfloat16)
    w_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])

    pid_w = gl.program_id(0)
    pid_t = gl.program_id(1)
    t0 = pid_t * BT
    # split-K: this program's chunks [first, first + n_chunks), its pointers moved to the first
    per_split = gl.cdiv(K // 64, SPLIT_K)
    first = gl.program_id(2) * per_split
    n_chunks = gl.minimum(per_split, K // 64 - first)
    x_ptr += first * 64
    w_ptr += first * 32
    s_ptr += first * 4

    # rows wrapped past N: loads stay in bounds, stores are masked
    rows = (pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, scale_layout))) % N
    group = gl.arange(0, 4, layout=gl.SliceLayout(0, scale_layout))
    s_off = gl.expand_dims(rows, 1) * stride_sn + gl.expand_dims(group, 0)
    w_rows = (pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, w_copy))) % N
    w_off = gl.expand_dims(w_rows, 1) * stride_wn + gl.expand_dims(
        gl.arange(0, 32, layout=gl.SliceLayout(0, w_copy)), 0
    )

    x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BT, 64], x_layout)
    w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BW, 32], w_layout)
    for i in gl.static_range(STAGES - 1):
        _issue_chunk_copy(
            x_ptr, w_ptr, x_smem, w_smem, w_off, i, n_chunks, t0, M, stride_xm, STAGES, BT, x_copy
        )

    # block scales: plain loads two chunks ahead (a byte per row and thread a chunk; cp.async moves 4 at least)
    s = gl.load(s_ptr + s_off)
    s_next = gl.load(s_ptr + s_off + gl.minimum(1, n_chunks - 1) * 4)
    acc = gl.zeros([BW, BT], gl.float32, layout=mma_layout)
    a_prev = gl.zeros([BW, 64], gl.bfloat16, layout=a_layout)
    for c in range(n_chunks):
        s_after = gl.load(s_ptr + s_off + gl.minimum(c + 2, n_chunks - 1) * 4)
        async_copy.wait_group(STAGES - 2)
        _cta_barrier()  # every thread's copies of chunk c have landed
        a = _decode_chunk(
            w_smem.index(c % STAGES).reshape([BW, 4, 8]).load(byte_layout), s, a_layout, BW, NORMAL
        )
        fence_async_shared()
        acc = warpgroup_mma(a, x_smem.index(c % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a_prev = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc, a_prev))
        a_prev = a
        _cta_barrier()  # every warpgroup is done with chunk c - 1's slot before it is refilled
        _issue_chunk_copy(
            x_ptr,
            w_ptr,
            x_smem,
            w_smem,
            w_off,
            c + STAGES - 1,
            n_chunks,
            t0,
            M,
            stride_xm,
            STAGES,
            BT,
            x_copy,
        )
        s = s_next
        s_next = s_after
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)
    _cta_barrier()  # the epilogue's layout change may reuse the rings' shared memory: all warpgroups must be done

    fold = gl.load(s2_ptr).to(gl.float32) * 4611686018427387904.0  # scale_2 * 2**62 (the decoder's fold)
    # out is [M, N] row-major: 8 consecutive N a thread (16-byte stores) instead of the MMA layout's scattered pairs
    out_layout: gl.constexpr = gl.BlockedLayout([8, 1], [BW // 8, 32 * 8 // BW], [1, num_warps], [0, 1])
    y = gl.convert_layout((acc * fold).to(out_ptr.dtype.element_ty), out_layout)  # fp32 with SPLIT_K > 1
    rn = pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, out_layout))
    rt = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, out_layout))
    ptrs = out_ptr + gl.expand_dims(rt, 0) * stride_om + gl.expand_dims(rn, 1)
    ok = gl.expand_dims(rn < N, 1) & gl.expand_dims(rt < M, 0)
    if SPLIT_K == 1:
        gl.store(ptrs, y, mask=ok)
    else:
        gl.atomic_add(ptrs, y, mask=ok, sem="relaxed")


def w4a16_wgmma(
    x_perm: torch.Tensor, w: NVFP4Tensor, *, block_t: int = 128, num_warps: int = 4, stages: int = 4,
    in_flight: int = 1, split_k: int = 1, row_reps: int = 1, normal: bool | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x @ dequant(w)^T for x already in the kernel's K order (`permute_activations`); bf16, sm_90."""
    m, k = x_perm.shape
    n = w.packed.shape[0]
    if k % CHUNK or w.packed.shape[1] * 2 != k:
        raise ValueError(
            f"K = {k} must be a multiple of {CHUNK} and match the weight ({w.packed.shape[1] * 2})"
        )
    if x_perm.dtype != torch.bfloat16 or x_perm.stride(1) != 1:
        raise ValueError("activations must be contiguous bf16 rows")
    if normal is None:
        normal = w.normal_scales()
    out = torch.empty(m, n, dtype=x_perm.dtype, device=x_perm.device) if out is None else out
    # split-K sums fp32 partials with atomics into a zeroed buffer, then one cast
    chunks = k // CHUNK
    split_k = triton.cdiv(chunks, triton.cdiv(chunks, max(1, split_k)))  # no split left without a chunk
    target = out if split_k == 1 else torch.zeros(m, n, dtype=torch.float32, device=x_perm.device)
    grid = (triton.cdiv(n, 16 * num_warps * row_reps), triton.cdiv(m, block_t), split_k)
    _w4a16_wgmma_kernel[grid](
        x_perm, w.packed, w.scale.view(torch.uint8), w.scale_2, target, m, n, k,
        x_perm.stride(0), w.packed.stride(0), w.scale.stride(0), target.stride(0),
        BT=block_t, STAGES=stages, NORMAL=normal, IN_FLIGHT=in_flight, SPLIT_K=split_k, ROW_REPS=row_reps, num_warps=num_warps,
    )  # fmt: skip
    if split_k > 1:
        out.copy_(target)
    return out
