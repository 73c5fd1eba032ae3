"""Block scales read as 32-bit words (`NVFP4KIT_WORD_SCALES`, nvfp4_tile.scale_load_mode): the same weights as
the byte loads, so every MoE tile gives the same output bit for bit."""

import warnings

import pytest
import torch

from nvfp4kit.kernels import nvfp4_tile
from nvfp4kit.kernels.configs import MoEConfig
from nvfp4kit.kernels.fused_moe import fused_moe

from .helpers import DEVICE, random_experts

pytestmark = pytest.mark.cuda(also_cpu=True)

# K = 192 (3 words of scales a row) read 128 at a time: the last step masks a word; K = 128 in one or two steps
HIDDEN, INTER = 192, 128
CONFIGS = {
    "sorted": MoEConfig(
        block_m=16, gate_up_block_n=32, gate_up_block_k=128, down_block_n=32, down_block_k=64
    ),
    "pair_token": MoEConfig(
        sorted=False, gate_up_block_n=32, gate_up_block_k=64, down_block_n=32, down_block_k=128
    ),
    "halves": MoEConfig(block_m=16, halves=True, gate_up_block_k=128, down_block_k=128),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_word_scale_loads_give_the_byte_loads_results(monkeypatch, name):
    gate_up = random_experts(4, 2 * INTER, HIDDEN, seed=11)
    down = random_experts(4, HIDDEN, INTER, seed=12)
    gen = torch.Generator().manual_seed(5)
    weights, ids = torch.topk(torch.randn(6, 4, generator=gen).softmax(-1), 2)
    x = torch.randn(6, HIDDEN, generator=gen).to(DEVICE)
    ids, weights = ids.to(DEVICE), weights.to(DEVICE)
    outs = []
    for words in (False, True):
        monkeypatch.setattr(nvfp4_tile, "WORD_SCALES", words)
        assert nvfp4_tile.scale_load_mode(gate_up.kernel_operands()[1], HIDDEN, 128) == (2 if words else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's exp overflows
            outs.append(fused_moe(x, ids, weights, gate_up, down, config=CONFIGS[name]))
    assert torch.equal(outs[0], outs[1])


def test_word_scales_only_where_whole_words_line_up(monkeypatch):
    monkeypatch.setattr(nvfp4_tile, "WORD_SCALES", True)
    scale = random_experts(2, 32, 192, seed=1).kernel_operands()[1]  # rows of 12 bytes
    assert nvfp4_tile.scale_load_mode(scale, 192, 64) == 2
    assert nvfp4_tile.scale_load_mode(scale, 192, 32) == 1  # a K step of half a word
    odd = random_experts(2, 32, 80, seed=1).kernel_operands()[1]  # rows of 5 bytes
    assert nvfp4_tile.scale_load_mode(odd, 80, 64) == 1
    assert nvfp4_tile.scale_load_mode(scale[:, :, 1:], 192, 64) == 1  # a view off the word boundary
    monkeypatch.setattr(nvfp4_tile, "WORD_SCALES", False)
    assert nvfp4_tile.scale_load_mode(scale, 192, 64) == 1
