"""NVFP4 numerics: the golden block of the format notes, and bit-exactness against ModelOpt 0.47's quantizer."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.formats.nvfp4 import (
    BLOCK,
    NVFP4Tensor,
    cat_rows,
    dequantize,
    global_scale,
    quantize,
    stack_experts,
)

GOLDEN_ROW = [6, -6, 3, -3, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 0.1, -0.1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, so fp8/fp32 compare bit for bit (NaN == NaN, -0 != +0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_golden_block():
    row = torch.tensor(GOLDEN_ROW, dtype=torch.bfloat16)
    q = quantize(torch.stack([row, row / 4]))
    assert q.scale_2.dtype == torch.float32 and q.scale_2.dim() == 0
    assert q.scale_2.view(torch.int32).item() == 0x3B124925
    assert _bits(q.scale).tolist() == [0x7E, 0x6E]
    assert q.packed.dtype == torch.uint8
    assert q.packed[0].tolist() == [0xF7, 0xD5, 0x20, 0x42, 0x64, 0x86, 0xEA, 0x80]
    assert torch.equal(q.packed[0], q.packed[1])
    expected = torch.tensor([6, -6, 3, -3, 0, 1, 1, 2, 2, 4, 4, 0, -1, -4, 0, 0], dtype=torch.float32)
    # scale_2 = 6/2688 is not exact in fp32, so the decoded values are within an ulp of the grid
    torch.testing.assert_close(q.dequantize()[0], expected, rtol=2e-7, atol=0)
    torch.testing.assert_close(q.dequantize()[1], expected / 4, rtol=2e-7, atol=0)


def test_input_dim_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="input dimension 40 is not a multiple of the NVFP4 block size 16"):
        quantize(torch.ones(8, 40))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 8, 32))


def _outlier_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """BF16 weights with the awkward cases: outlier columns and rows, zero blocks, tiny blocks, exact ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randint(0, k, (3,), generator=g)] *= 40.0  # outlier input channels
    w[torch.randint(0, n, (2,), generator=g)] *= 25.0  # outlier output rows
    w[1, :BLOCK] = 0.0  # an all-zero block (scale 1.0 by convention)
    w[2, BLOCK : 2 * BLOCK] = 1e-9  # so small its block scale clamps to 2^-9
    w[3, : 2 * BLOCK] = torch.tensor([0.75, 1.75, 3.5, 2.5, 1.25, 5.0, 6.0, 0.25] * 4) * 1e-3  # ties
    w[4, :4] = torch.tensor([-0.0, 0.0, -1e-30, 1e-30])
    return w.to(torch.bfloat16)


@pytest.fixture(scope="module")
def modelopt_nvfp4():
    from modelopt.torch.quantization.qtensor import nvfp4_tensor as qtensor

    return qtensor.NVFP4QTensor


@pytest.mark.parametrize("shape,seed", [((64, 256), 0), ((48, 96), 1), ((8, 2816), 2)])
def test_bit_exact_with_modelopt(modelopt_nvfp4, shape, seed):
    w = _outlier_weight(*shape, seed)
    ours = quantize(w)
    # ModelOpt's export path: fp32 weight, dynamic block scales, then pack (what export_hf_checkpoint runs)
    q, scale, scale_2 = modelopt_nvfp4.quantize(w.float(), BLOCK)
    assert torch.equal(_bits(ours.scale_2), _bits(scale_2.float().reshape(())))
    assert torch.equal(_bits(ours.scale), _bits(scale))
    assert torch.equal(ours.packed, q._quantized_data)
    theirs = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK})
    # ModelOpt multiplies the two scales first; we apply scale_2 last (as the kernels do): an ulp apart at most
    torch.testing.assert_close(ours.dequantize(), theirs, rtol=2.5e-7, atol=0)


def test_bit_exact_with_shared_scale_2(modelopt_nvfp4):
    """Fused groups (q/k/v, gate/up) quantize every member against the group's max amax."""
    parts = [_outlier_weight(32, 64, s) for s in (3, 4, 5)]
    shared = global_scale(max(p.float().abs().amax() for p in parts))
    for part in parts:
        ours = quantize(part, scale_2=shared)
        q, scale, _ = modelopt_nvfp4.quantize(part.float(), BLOCK, None, shared)
        assert torch.equal(_bits(ours.scale), _bits(scale))
        assert torch.equal(ours.packed, q._quantized_data)
        assert torch.equal(ours.scale_2, shared)


def test_cat_rows_needs_one_scale_2():
    a, b = _outlier_weight(16, 32, 6), _outlier_weight(16, 32, 7)
    shared = global_scale(torch.maximum(a.float().abs().amax(), b.float().abs().amax()))
    fused = cat_rows([quantize(a, scale_2=shared), quantize(b, scale_2=shared)])
    assert fused.shape == (32, 32)
    assert torch.equal(
        fused.dequantize(), torch.cat([quantize(x, scale_2=shared).dequantize() for x in (a, b)])
    )
    with pytest.raises(ValueError, match="different weight_scale_2"):
        cat_rows([quantize(a), quantize(b * 3)])


def test_stacked_experts_dequantize_per_expert():
    experts = [quantize(_outlier_weight(16, 32, s)) for s in range(3)]
    stacked = stack_experts(experts)
    assert stacked.packed.shape == (3, 16, 16) and stacked.scale.shape == (3, 16, 2)
    assert stacked.scale_2.shape == (3,)
    full = stacked.dequantize()
    for e, expert in enumerate(experts):
        assert torch.equal(full[e], expert.dequantize())
        assert torch.equal(stacked.expert(e).dequantize(), expert.dequantize())


def test_dequantize_matches_formula():
    q = quantize(_outlier_weight(8, 64, 9))
    assert isinstance(q, NVFP4Tensor)
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    codes = torch.stack([q.packed & 0xF, q.packed >> 4], dim=-1).flatten(-2)
    manual = values[codes.long()] * q.scale.float().repeat_interleave(BLOCK, dim=-1) * q.scale_2
    assert torch.equal(dequantize(q.packed, q.scale, q.scale_2), manual)
