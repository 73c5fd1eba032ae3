"""Pull a tensor into the GPU's L2 cache without reading it into registers: `prefetch.global.L2` per 128-byte line.

At decode sizes a W4A16 linear streams a few MB of weights in ~5-12 us, most of it the ramp of its first DRAM
requests, while the kernels between two linears (norms, RoPE, attention, the router) leave the memory bus idle.
A prefetch issued during those kernels (`model/prefetch.py` launches this on a side stream) lets the linear find
its weights in L2. A prefetch is only a hint: it changes no value anywhere, so nothing waits for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.configs import interpreting

LINE_BYTES = 128
# lines a program issues (4 warps x 32 lanes x 8 unrolled steps): a 13 MB weight takes ~25 short programs
_BLOCK = 128
_STEPS = 8


@triton.jit
def _l2_prefetch_kernel(base_ptr, num_lines, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    for s in tl.static_range(STEPS):
        line = tl.minimum(
            first + s * BLOCK + tl.arange(0, BLOCK), num_lines - 1
        )  # a repeat of the last is free
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
            "=r,l",
            [base_ptr + line * 128],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


def prefetch_supported(t: torch.Tensor) -> bool:
    """CUDA tensors on SM80+ outside the CPU interpreter (which runs no PTX)."""
    return t.is_cuda and not interpreting() and torch.cuda.get_device_capability(t.device) >= (8, 0)


def prefetch_l2(t: torch.Tensor) -> None:
    """Start moving the bytes of a contiguous `t` into L2 and return at once (other tensors: nothing happens)."""
    if t.numel() == 0 or not t.is_contiguous() or not prefetch_supported(t):
        return
    lines = triton.cdiv(t.numel() * t.element_size(), LINE_BYTES)
    grid = (triton.cdiv(lines, _BLOCK * _STEPS),)
    _l2_prefetch_kernel[grid](t.view(-1).view(torch.uint8), lines, BLOCK=_BLOCK, STEPS=_STEPS, num_warps=4)
