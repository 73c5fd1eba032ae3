"""The in-kernel NVFP4 decode is exact for every nibble and every E4M3 scale byte."""

import pytest
import torch
import triton
import triton.language as tl

from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.kernels.configs import interpreting
from nvfp4kit.kernels.nvfp4_tile import ASM_FOLD_EXP, BITS_FOLD_EXP, load_weight_tile

from .helpers import DEVICE, ON_GPU

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU


@triton.jit
def _expand_kernel(w_ptr, s_ptr, out_ptr, K, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    w = load_weight_tile(w_ptr, s_ptr, rows, k0, K, K // 2, K // 16, BN, BK, True, ASM, True, tl.float32)
    cols = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w)


def _every_code_and_scale(*, normal_only: bool = False) -> NVFP4Tensor:
    """128 rows x 512 columns: every byte value in each row, every non-NaN E4M3 byte as a block scale (or every
    normal one: nonzero exponent)."""
    n, k = 128, 512
    packed = ((torch.arange(k // 2)[None, :] + 37 * torch.arange(n)[:, None]) % 256).to(torch.uint8)
    scale = (torch.arange(k // 16)[None, :] * 7 + torch.arange(n)[:, None]) % 127
    if normal_only:
        scale = 8 + scale % 119  # 0x08 .. 0x7E
    scale = scale.to(torch.uint8)
    return NVFP4Tensor(packed, scale.view(torch.float8_e4m3fn), torch.tensor(1.0)).to(DEVICE)


def test_normal_scales_tells_whether_any_block_scale_is_zero_or_subnormal():
    assert _every_code_and_scale(normal_only=True).normal_scales()
    assert not _every_code_and_scale().normal_scales()  # holds 0x00 and the subnormals 0x01-0x07
    weight = _every_code_and_scale(normal_only=True)
    weight.scale.view(torch.uint8)[5, 3] = 0x03  # one subnormal block among 4,096
    assert not NVFP4Tensor(weight.packed, weight.scale, weight.scale_2).normal_scales()


def _expand(weight: NVFP4Tensor, *, asm: int) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, k, device=DEVICE)
    _expand_kernel[(n // 32, k // 128)](
        weight.packed, weight.scale.view(torch.uint8), out, k, BN=32, BK=128, ASM=asm
    )
    return out


def test_bits_decode_is_exact_for_all_codes_and_scales():
    weight = _every_code_and_scale()
    expected = weight.dequantize(torch.float32) * 2.0**-BITS_FOLD_EXP
    assert torch.equal(_expand(weight, asm=0), expected)


@pytest.mark.skipif(not ON_GPU or interpreting(), reason="PTX decode runs on a CUDA GPU only")
@pytest.mark.parametrize("asm, normal_only", [(1, False), (2, True)])
def test_asm_decode_is_exact_for_all_codes_and_scales(asm, normal_only):
    """Mode 1 decodes any scale byte, mode 2 (two integer ops a scale) the normal ones it is chosen for."""
    weight = _every_code_and_scale(normal_only=normal_only)
    expected = weight.dequantize(torch.float32) * 2.0**-ASM_FOLD_EXP
    assert torch.equal(_expand(weight, asm=asm), expected)
