"""The Gluon wgmma W4A16 kernel (`kernels/w4a16_wgmma.py`, sm_90) on the card against fp32 math on the dequantized
weight: token counts that do not fill a tile, rows that do not fill a warp's 16, the 26B-A4B K values, every tile
config it offers, both scale decoders, and one or no wgmma group left in flight across a K step."""

import pytest
import torch

from nvfp4kit.tuning.cases import random_nvfp4, rel_error

pytestmark = pytest.mark.cuda
BOUND = 1e-2  # bf16 output of fp32 sums of exact bf16 products


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _hopper(), reason="wgmma needs an sm_90 card")
@pytest.mark.parametrize("m", [1, 37, 128, 300])
@pytest.mark.parametrize("n,k", [(200, 2112), (2816, 64), (64, 2816), (136, 1088)])
@pytest.mark.parametrize(
    "block_t,warps,stages,in_flight,split_k,row_reps",
    [(16, 4, 8, 1, 4, 1), (64, 4, 6, 1, 8, 1), (128, 4, 4, 0, 1, 1), (128, 8, 3, 1, 1, 1), (128, 8, 4, 1, 1, 2),
     (64, 8, 4, 1, 1, 2)],
)  # fmt: skip
def test_matches_fp32_math(m, n, k, block_t, warps, stages, in_flight, split_k, row_reps):
    from nvfp4kit.kernels.w4a16_wgmma import k_permutation, permute_activations, w4a16_wgmma

    w = random_nvfp4(n, k, seed=m + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xp = permute_activations(x, k_permutation(k, "cuda"))
    kw = dict(
        block_t=block_t,
        num_warps=warps,
        stages=stages,
        in_flight=in_flight,
        split_k=split_k,
        row_reps=row_reps,
    )
    got = w4a16_wgmma(xp, w, **kw)
    assert got.shape == (m, n)
    assert rel_error(got, x.float() @ w.dequantize(torch.float32).T) < BOUND


@pytest.mark.skipif(not _hopper(), reason="wgmma needs an sm_90 card")
def test_subnormal_block_scales():
    from nvfp4kit.kernels.w4a16_wgmma import k_permutation, permute_activations, w4a16_wgmma

    w = random_nvfp4(72, 1024, seed=5)
    w.scale.view(torch.uint8)[:, ::5] &= 0x07
    assert not w.normal_scales()
    x = torch.randn(50, 1024, device="cuda", dtype=torch.bfloat16)
    got = w4a16_wgmma(permute_activations(x, k_permutation(1024, "cuda")), w)
    assert rel_error(got, x.float() @ w.dequantize(torch.float32).T) < BOUND
