"""GeGLU of the dense MLP in one launch: gelu_tanh(gate) * up from the fused gate_up projection [T, 2I].

fp32 math, one rounding on the way out. The reference is the torch backend's `geglu` on fp32 inputs; no host
syncs, so the op replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs


@triton.jit
def geglu_sigmoid(gate, up):
    """gelu_tanh(gate) * up as g * sigmoid(2u) (u = sqrt(2/pi) (g + 0.044715 g^3)): the MoE kernels' epilogue."""
    return gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) * up


@triton.jit
def gelu_tanh(g):
    """g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3): 0.5 g (1 + tanh(u)), with exp only of -|2u|."""
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    e = tl.exp(-2.0 * tl.abs(u))
    return g * tl.where(u >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _geglu_kernel(gate_up_ptr, out_ptr, inter, stride_in, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    src = gate_up_ptr + row * stride_in + cols
    gate = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(src + inter, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (gelu_tanh(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate columns first) -> [T, I] in gate_up.dtype."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"geglu takes gate_up [T, 2I], got shape {tuple(gate_up.shape)}")
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _geglu_kernel[(t, triton.cdiv(inter, block))](
            gate_up,
            out,
            inter,
            gate_up.stride(0),
            BLOCK=block,
            num_warps=max(1, min(4, block // 256)),
            **pdl_args(out.device),
        )
    return out
