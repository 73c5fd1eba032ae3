"""NVFP4 numerics: FP4 E2M1 values, FP8 E4M3 block scales over 16 inputs, an FP32 tensor scale.

    W[n, k] = E2M1[code(n, k)] * fp8(weight_scale[n, k // 16]) * weight_scale_2

Packing: uint8 [N, K/2], element 2j in the low nibble, 2j+1 in the high nibble; code = sign<<3 | index.
Rounding is round-half-to-even on the E2M1 grid with saturation at +-6, exactly as ModelOpt 0.47 does it,
and the element is divided by the *FP8-rounded* block scale so the bits match ModelOpt's export.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_MIN = 2.0**-9  # smallest E4M3 subnormal; ModelOpt clamps block scales to [2^-9, 448]

# value of each 4-bit code (bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# midpoints between neighbouring magnitudes; a tie goes to the even code (index 0, 2, 4, 6)
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_ROUND_UP = (0.75, 1.75, 3.5)  # ties whose even neighbour is the upper one


@dataclass
class NVFP4Tensor:
    """A quantized weight: `packed` uint8 [N, K/2], `scale` float8_e4m3fn [N, K/16], `scale_2` fp32 0-d.

    Stacked experts carry a leading expert dim: [E, N, K/2], [E, N, K/16] and a per-expert `scale_2` [E].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    scale_2: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def expert(self, e: int) -> NVFP4Tensor:
        return NVFP4Tensor(self.packed[e], self.scale[e], self.scale_2[e])

    def to(self, device: torch.device | str) -> NVFP4Tensor:
        return NVFP4Tensor(self.packed.to(device), self.scale.to(device), self.scale_2.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.scale, self.scale_2, dtype=dtype)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel() + 4

    def normal_scales(self) -> bool:
        """Whether every block scale is a normal E4M3 number (nonzero exponent: no zero or subnormal scale), which
        lets the GPU kernels decode scales with two integer ops (kernels/nvfp4_tile.py). Asked of the device once
        per weight and kept; inside a CUDA-graph capture a weight never asked counts as False (the exact general
        path: the warm-up before capture has asked every weight the graphs use)."""
        known = self.__dict__.get("_normal_scales")
        if known is None:
            if self.packed.is_cuda and torch.cuda.is_current_stream_capturing():
                return False
            known = bool(((self.scale.view(torch.uint8) & 0x78) != 0).all())
            self.__dict__["_normal_scales"] = known
        return known

    def kernel_operands(self, *, stacked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed codes, scales as raw bytes, scale_2 as flat fp32): what the kernels take, made once per weight
        (each view or cast costs a few microseconds of host time, and a prefill step launches hundreds); `stacked`
        gives a single matrix a leading expert dim of 1. The fields are never reassigned, so views stay valid."""
        cache = self.__dict__.setdefault("_operands", {})
        cached = cache.get(stacked)
        if cached is None:
            packed, scale = self.packed, self.scale.view(torch.uint8)
            if stacked and packed.dim() == 2:
                packed, scale = packed.unsqueeze(0), scale.unsqueeze(0)
            cached = (packed, scale, self.scale_2.reshape(-1).to(torch.float32))
            # a cast made during CUDA-graph capture holds its values only after a replay: not kept for eager use
            if not (self.packed.is_cuda and torch.cuda.is_current_stream_capturing()):
                cache[stacked] = cached
        return cached


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to 4-bit codes (uint8, 0..15)."""
    mag = x.abs()
    bounds = torch.tensor(_BOUNDS, dtype=x.dtype, device=x.device)
    idx = torch.searchsorted(bounds, mag.contiguous())  # ties land on the lower bin ...
    for tie in _TIES_ROUND_UP:  # ... except where round-half-to-even goes up
        idx = idx + (mag == tie).to(idx.dtype)
    idx = torch.where(torch.isnan(mag), torch.full_like(idx, 7), idx)  # NaN saturates like ModelOpt
    sign = (x < 0).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, even element in the low nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 (or input_scale) from an absolute max: amax / (6 * 448), as fp32 0-d.

    The division runs on the CPU: CUDA turns division by a Python number into multiplication by its
    reciprocal, which can differ in the last bit, and the stored scale must not depend on the device.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    return (amax.cpu() / (E2M1_MAX * E4M3_MAX)).to(amax.device)


def block_scales(weight: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 scale of each 16-element block along the last dim, ModelOpt's clamping."""
    n, k = weight.shape
    amax = weight.float().abs().reshape(n, k // BLOCK, BLOCK).amax(dim=-1)
    scale = amax / (E2M1_MAX * scale_2.float())
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(
    weight: torch.Tensor, *, scale_2: torch.Tensor | None = None, block_scale: torch.Tensor | None = None
) -> NVFP4Tensor:
    """Quantize a 2-D weight [N, K] (K a multiple of 16) to NVFP4, bit-compatible with ModelOpt.

    `scale_2` defaults to amax(|W|)/2688; pass a shared one for fused groups (q/k/v, gate/up).
    `block_scale` (fp8) may be given by a calibration method that searched for better scales.
    """
    if weight.dim() != 2:
        raise ValueError(f"NVFP4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"input dimension {k} is not a multiple of the NVFP4 block size {BLOCK}")
    w = weight.float()
    if scale_2 is None:
        scale_2 = global_scale(w.abs().amax())
    scale_2 = scale_2.float().reshape(())
    if block_scale is None:
        block_scale = block_scales(w, scale_2)
    denom = block_scale.float() * scale_2  # product first, in fp32, as ModelOpt does
    scaled = w.reshape(n, k // BLOCK, BLOCK) / denom[..., None]
    codes = e2m1_encode(scaled.reshape(n, k))
    return NVFP4Tensor(pack_nibbles(codes), block_scale, scale_2.clone())


def dequantize(
    packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packed NVFP4 [..., N, K/2] -> dense [..., N, K]. E2M1 x E4M3 is exact in bf16; scale_2 in fp32."""
    values = e2m1_decode(unpack_nibbles(packed), torch.float32)
    *lead, n, k = values.shape
    blocks = values.reshape(*lead, n, k // BLOCK, BLOCK) * scale.float()[..., None]
    s2 = scale_2.float()
    s2 = s2.reshape(-1, 1, 1, 1) if s2.dim() else s2  # a per-expert vector [E] scales each expert
    return (blocks * s2).reshape(*lead, n, k).to(dtype)


def cat_rows(parts: Sequence[NVFP4Tensor]) -> NVFP4Tensor:
    """Concatenate quantized weights along N (fused q/k/v, gate/up); lossless only with one shared scale_2."""
    if not parts:
        raise ValueError("cat_rows needs at least one NVFP4Tensor")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if (
            part.packed.shape[:-2] != first.packed.shape[:-2]
            or part.packed.shape[-1] != first.packed.shape[-1]
        ):
            raise ValueError(f"cannot fuse NVFP4 weights of shapes {first.shape} and {part.shape} (part {i})")
        if not torch.equal(part.scale_2, first.scale_2):
            raise ValueError(
                f"cannot fuse NVFP4 weights with different weight_scale_2 ({first.scale_2.tolist()} vs "
                f"{part.scale_2.tolist()} in part {i}); the checkpoint did not share scales in a fused group"
            )
    return NVFP4Tensor(
        torch.cat([p.packed for p in parts], dim=-2),
        torch.cat([p.scale for p in parts], dim=-2),
        first.scale_2.clone(),
    )


def stack_experts(experts: Sequence[NVFP4Tensor]) -> NVFP4Tensor:
    """Stack per-expert 2-D weights into [E, N, K/2] / [E, N, K/16] with a per-expert scale_2 [E]."""
    if not experts:
        raise ValueError("stack_experts needs at least one NVFP4Tensor")
    shapes = {e.shape for e in experts}
    if len(shapes) != 1:
        raise ValueError(f"experts have different shapes: {sorted(shapes)}")
    return NVFP4Tensor(
        torch.stack([e.packed for e in experts]),
        torch.stack([e.scale for e in experts]),
        torch.stack([e.scale_2.float().reshape(()) for e in experts]),
    )
