"""The wide fragment GEMV (`kernels/gemv_mma_wide.py`, 17-128 tokens) on the card against fp32 math on the
dequantized weight: token counts that fill and do not fill the 16-token groups and programs, rows that do not fill
the 8-row groups, K tails, both decoders, strided activations, and the path `w4a16_linear` takes for a tuned frag
config."""

import pytest
import torch

from nvfp4kit.kernels.configs import LinearConfig
from nvfp4kit.kernels.gemv_mma_wide import MAX_TOKENS, MIN_TOKENS, gemv_mma_wide, gemv_mma_wide_supported
from nvfp4kit.kernels.w4a16_linear import w4a16_linear
from nvfp4kit.tuning.cases import random_nvfp4, rel_error

pytestmark = pytest.mark.cuda
BOUND = 1e-2  # bf16 output of fp32 sums of exact bf16 products


@pytest.mark.parametrize("m", [17, 24, 31, 32, 33, 48, 63, 64, 65, 96, 100, 128])
@pytest.mark.parametrize("n,k", [(8, 32), (40, 2816), (2816, 2112), (100, 544), (1000, 96)])
@pytest.mark.parametrize(
    "k_warps,unroll,row_groups,groups,rows_per_warp",
    [(1, 1, 1, 4, 8), (2, 1, 1, 2, 8), (4, 2, 1, 4, 8), (2, 1, 2, 3, 16), (1, 2, 4, 1, 8), (2, 1, 1, 4, 16)],
)
def test_matches_fp32_math(m, n, k, k_warps, unroll, row_groups, groups, rows_per_warp):
    w = random_nvfp4(n, k, seed=m + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = gemv_mma_wide(
        x,
        w,
        k_warps=k_warps,
        unroll=unroll,
        row_groups=row_groups,
        groups=groups,
        rows_per_warp=rows_per_warp,
    )
    assert got.shape == (m, n)
    assert rel_error(got, x.float() @ w.dequantize(torch.float32).T) < BOUND


def test_subnormal_block_scales_and_strided_tokens():
    w = random_nvfp4(72, 1024, seed=5)
    w.scale.view(torch.uint8)[:, ::5] &= 0x07  # exponent bits zero: the decoder that handles subnormals
    assert not w.normal_scales()
    for m in (20, 57):
        wide = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        x = wide[:, 512:1536]  # row stride 2048, not K
        assert rel_error(gemv_mma_wide(x, w), x.float() @ w.dequantize(torch.float32).T) < BOUND


def test_linear_runs_a_wide_frag_config():
    w = random_nvfp4(264, 512, seed=3)
    x = torch.randn(40, 512, device="cuda", dtype=torch.bfloat16)
    cfg = LinearConfig("frag", 48, 32, 256, 1, num_warps=2, decode="asm", unroll=1, rows_per_warp=16)
    got = w4a16_linear(x, w, config=cfg)
    assert torch.equal(
        got, gemv_mma_wide(x, w, k_warps=2, unroll=1, row_groups=2, groups=3, rows_per_warp=16)
    )
    assert rel_error(got, x.float() @ w.dequantize(torch.float32).T) < BOUND


def test_refuses_what_it_cannot_run():
    w = random_nvfp4(16, 64)
    for m in (MIN_TOKENS - 1, MAX_TOKENS + 1):
        assert not gemv_mma_wide_supported(torch.randn(m, 64, device="cuda", dtype=torch.bfloat16), w)
    assert not gemv_mma_wide_supported(torch.randn(32, 64, device="cuda", dtype=torch.float16), w)
    with pytest.raises(ValueError):
        gemv_mma_wide(torch.randn(MAX_TOKENS + 1, 64, device="cuda", dtype=torch.bfloat16), w)
