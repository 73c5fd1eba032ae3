"""Prefill-sized dense W4A16 linears: the NVFP4 -> dense expansion and the dequantize-then-matmul path.

The threshold is lowered per call (`dequant_min_m`) so tiny shapes run it on the CPU under the interpreter.
Shapes are the 26B-A4B linears' awkward traits scaled down: N not a multiple of the 32-row expansion tile,
K a multiple of 16 but not of the 128-column tile, M not a multiple of any tile.
"""

import pytest
import torch

from nvfp4kit.formats.nvfp4 import stack_experts
from nvfp4kit.kernels import dequant
from nvfp4kit.kernels.dequant import dequantize_nvfp4, release_scratch, scratch_bytes
from nvfp4kit.kernels.w4a16_linear import w4a16_linear

from .helpers import BF16_BOUND, DEVICE, FP32_BOUND, random_weight, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU

# (N, K): down-like (N > K, K = 9 x 16), qkv-like (N >> K), o-like (K = 2 x 128)
SHAPES = [(176, 144), (264, 48), (40, 256)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize_matches_reference_bitwise(n, k):
    weight = random_weight(n, k, seed=n)
    assert torch.equal(dequantize_nvfp4(weight, dtype=torch.float32), weight.dequantize(torch.float32))
    assert torch.equal(dequantize_nvfp4(weight, dtype=torch.bfloat16), weight.dequantize(torch.bfloat16))


def test_dequantize_stacked_experts_and_row_ranges():
    experts = stack_experts([random_weight(40, 48, seed=s) for s in range(3)])
    experts.scale_2.copy_(torch.tensor([0.5, 2.0, 3.0]))  # each expert keeps its own global scale
    ref = experts.dequantize(torch.float32)
    assert torch.equal(dequantize_nvfp4(experts, dtype=torch.float32), ref)
    up = dequantize_nvfp4(experts, dtype=torch.float32, rows=(20, 20))
    assert torch.equal(up, ref[:, 20:])
    out = torch.empty(3, 7, 48, device=DEVICE)
    assert dequantize_nvfp4(experts, dtype=torch.float32, rows=(33, 7), out=out) is out
    assert torch.equal(out, ref[:, 33:])
    with pytest.raises(ValueError, match="rows"):
        dequantize_nvfp4(experts, rows=(30, 20))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nvfp4(experts, dtype=torch.float32, out=torch.empty(3, 40, 40, device=DEVICE))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 37])
def test_dequant_linear_matches_reference(n, k, m):
    weight = random_weight(n, k, seed=m + n)
    x = torch.randn(m, k, device=DEVICE)
    ref = x @ weight.dequantize(torch.float32).T
    assert rel_error(w4a16_linear(x, weight, dequant_min_m=1), ref) < FP32_BOUND
    y = w4a16_linear(x.bfloat16(), weight, dequant_min_m=1)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_error(y, x.bfloat16().float() @ weight.dequantize(torch.float32).T) < BF16_BOUND


def test_threshold_picks_the_path_and_scratch_is_reused(monkeypatch):
    calls = []
    real = dequant.dequantize_nvfp4
    monkeypatch.setattr(dequant, "dequantize_nvfp4", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    release_scratch()
    small, large = random_weight(40, 48, seed=1), random_weight(176, 144, seed=2)
    x = torch.randn(2, 3, 48, device=DEVICE)
    ref = x @ small.dequantize(torch.float32).T
    below = w4a16_linear(x, small, dequant_min_m=7)  # 6 rows: the Triton kernel
    assert calls == [] and scratch_bytes() == 0
    above = w4a16_linear(x, small, dequant_min_m=6)
    assert len(calls) == 1 and above.shape == (2, 3, 40)
    assert rel_error(below, ref) < FP32_BOUND and rel_error(above, ref) < FP32_BOUND
    w4a16_linear(torch.randn(4, 144, device=DEVICE), large, dequant_min_m=1)
    after_large = scratch_bytes()
    assert after_large == 176 * 144 * 4  # one fp32 buffer, grown to the larger weight
    w4a16_linear(x, small, dequant_min_m=1)
    assert scratch_bytes() == after_large  # the smaller weight reuses it
    release_scratch()
    assert scratch_bytes() == 0


@pytest.mark.parametrize("tile", [(16, 64, 2), (64, 256, 4)])
def test_expansion_tiles_give_the_same_values(tile):
    weight = random_weight(264, 48, seed=5)  # K = 48: one partial column tile whatever its width
    ref = weight.dequantize(torch.bfloat16)
    assert torch.equal(dequantize_nvfp4(weight, tile=tile), ref)
