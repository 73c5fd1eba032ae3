"""The fragment GEMV (`kernels/gemv_mma.py`) on the card against fp32 math on the dequantized weight: every
token count it takes (1-8: one token per A row pair, 9-16: two), rows that do not fill its 8-row groups, K tails, both decoders (all-normal block scales
and some subnormal ones), and strided activations."""

import pytest
import torch

from nvfp4kit.kernels.gemv_mma import MAX_TOKENS, gemv_mma, gemv_mma_supported
from nvfp4kit.tuning.cases import random_nvfp4, rel_error

pytestmark = pytest.mark.cuda
BOUND = 1e-2  # bf16 output of fp32 sums of exact bf16 products


@pytest.mark.parametrize("m", range(1, MAX_TOKENS + 1))
@pytest.mark.parametrize("n,k", [(8, 32), (40, 2816), (2816, 2112), (100, 544), (1000, 96)])
@pytest.mark.parametrize("k_warps,unroll,row_groups", [(1, 1, 1), (4, 2, 1), (8, 4, 1), (2, 1, 4), (1, 2, 8)])
def test_matches_fp32_math(m, n, k, k_warps, unroll, row_groups):
    w = random_nvfp4(n, k, seed=m + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = gemv_mma(x, w, k_warps=k_warps, unroll=unroll, row_groups=row_groups)
    assert got.shape == (m, n)
    assert rel_error(got, x.float() @ w.dequantize(torch.float32).T) < BOUND


def test_subnormal_block_scales_and_strided_tokens():
    w = random_nvfp4(72, 1024, seed=5)
    w.scale.view(torch.uint8)[:, ::5] &= 0x07  # exponent bits zero: the decoder that handles subnormals
    assert not w.normal_scales()
    for m in (3, 13):
        wide = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        x = wide[:, 512:1536]  # row stride 2048, not K
        got = gemv_mma(x, w)
        assert rel_error(got, x.float() @ w.dequantize(torch.float32).T) < BOUND


def test_refuses_what_it_cannot_run():
    w = random_nvfp4(16, 64)
    assert not gemv_mma_supported(torch.randn(MAX_TOKENS + 1, 64, device="cuda", dtype=torch.bfloat16), w)
    assert not gemv_mma_supported(torch.randn(1, 64, device="cuda", dtype=torch.float16), w)
    with pytest.raises(ValueError):
        gemv_mma(torch.randn(MAX_TOKENS + 1, 64, device="cuda", dtype=torch.bfloat16), w)


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_moe_matches_the_torch_reference(tokens, top_k):
    from nvfp4kit.kernels.moe_frag import fused_moe_frag, moe_frag_supported
    from nvfp4kit.model.ops import TorchBackend

    experts, hidden, inter = 16, 512, 96  # inter 96: the down projection's 12-word K has a masked tail
    gate_up = random_nvfp4(2 * inter, hidden, experts=experts, seed=1)
    down = random_nvfp4(hidden, inter, experts=experts, seed=2)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    weights = weights * 1.5  # not renormalised: applied as given
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert moe_frag_supported(x, gate_up, down, top_k)
    out = fused_moe_frag(x, ids.reshape(-1).int(), weights.reshape(-1), gate_up, down, top_k=top_k)
    ref = TorchBackend().moe(x.float(), ids, weights, gate_up, down)
    assert rel_error(out, ref) < 2 * BOUND  # two bf16 roundings: the activation, then the output


@pytest.mark.parametrize("m", [1, 5, 8])
def test_dense_gate_up_geglu_in_one_launch(m):
    from nvfp4kit.kernels.moe_frag import frag_gate_up_geglu, frag_geglu_supported

    w = random_nvfp4(2 * 2112, 2816, seed=m)  # 26B-A4B's dense MLP: [gate | up] rows
    x = torch.randn(m, 2816, device="cuda", dtype=torch.bfloat16)
    assert frag_geglu_supported(x, w)
    gate, up = (x.float() @ w.dequantize(torch.float32).T).chunk(2, dim=-1)
    ref = torch.nn.functional.gelu(gate, approximate="tanh") * up
    assert rel_error(frag_gate_up_geglu(x, w), ref) < 2 * BOUND


@pytest.mark.parametrize("tokens,experts", [(1, 64), (9, 16), (40, 128), (100, 16)])
@pytest.mark.parametrize("gate_up_warps,down_warps", [((2, 2), (1, 4)), ((1, 1), (2, 1)), ((1, 4), (1, 8))])
@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("tiles", [(1, 1), (2, 2), (2, 1), (4, 4), (1, 4)])
def test_grouped_moe_matches_the_torch_reference(tokens, experts, gate_up_warps, down_warps, block, tiles):
    """Pairs sorted into blocks of 8 or 16 by expert: experts with no pairs, one, and several blocks (100 tokens x top-8
    over 16 experts: ~50 pairs each), column and row groups that do not divide the widths, 1, 2 or 4 MMA tiles a
    row group."""
    from nvfp4kit.kernels.moe_frag import frag_experts_supported
    from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped
    from nvfp4kit.model.ops import TorchBackend

    hidden, inter, top_k = 512, 96, 8
    gate_up = random_nvfp4(2 * inter, hidden, experts=experts, seed=3)
    down = random_nvfp4(hidden, inter, experts=experts, seed=4)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    weights, ids = torch.topk(torch.randn(tokens, experts, device="cuda", generator=gen).softmax(-1), top_k)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert frag_experts_supported(x, gate_up, down)
    out = fused_moe_grouped(
        x,
        ids.int(),
        weights,
        gate_up,
        down,
        gate_up_warps=gate_up_warps,
        down_warps=down_warps,
        block=block,
        tiles=tiles,
    )
    ref = TorchBackend().moe(x.float(), ids, weights, gate_up, down)
    assert rel_error(out, ref) < 2 * BOUND


@pytest.mark.parametrize("down_warps", [(1, 4), (2, 2)])
@pytest.mark.parametrize("tiles", [(1, 1), (2, 2)])
def test_grouped_moe_down_with_a_k_tail(down_warps, tiles):
    """inter 288 = 36 words: the down kernel's K loop takes two full 16-word steps and a 4-word tail with one
    warp splitting K, one full 32-word step and a tail with two."""
    from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped
    from nvfp4kit.model.ops import TorchBackend

    experts, hidden, inter, top_k = 16, 512, 288, 8
    gate_up = random_nvfp4(2 * inter, hidden, experts=experts, seed=7)
    down = random_nvfp4(hidden, inter, experts=experts, seed=8)
    for tokens in (9, 40):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        weights, ids = torch.topk(
            torch.randn(tokens, experts, device="cuda", generator=gen).softmax(-1), top_k
        )
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = TorchBackend().moe(x.float(), ids, weights, gate_up, down)
        out = fused_moe_grouped(x, ids.int(), weights, gate_up, down, down_warps=down_warps, tiles=tiles)
        assert rel_error(out, ref) < 2 * BOUND
