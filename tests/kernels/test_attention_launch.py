"""How decode attention is launched on cards that are not here: pipeline stages by shared memory, key splits by
waves of resident programs (a stand-in card answers the capability and SM-count questions)."""

import pytest
import torch

from nvfp4kit.kernels.attention_launch import choose_num_splits, decode_blocks_per_sm, select_config
from nvfp4kit.kernels.configs import StandIn, set_stand_in

CPU = torch.device("cpu")
SLIDING = dict(head_dim=256, group=2, fp8=True)  # 26B-A4B: 16 query heads over 8 KV heads
GLOBAL = dict(head_dim=512, group=8, fp8=True)  # 16 over 2


@pytest.fixture
def card():
    def use(capability, sms):
        set_stand_in(StandIn(capability, sms))

    yield use
    set_stand_in(None)


def splits(batch, kv_heads, keys, shape):
    return choose_num_splits(batch, kv_heads, keys, device=CPU, **shape)


@pytest.mark.parametrize(
    ("capability", "stages"), [((9, 0), 3), ((10, 0), 3), ((8, 0), 3), ((8, 6), 2), ((8, 9), 2), ((12, 0), 2)]
)
def test_fp8_sliding_tiles_take_three_stages_only_where_three_blocks_fit(capability, stages):
    """Three stages ran the sliding layer 10-12% faster on the H100; on 100 KB SMs (RTX 3090/4090/5090) they
    would leave room for two blocks instead of three."""
    tile = select_config(256, 2, decode=True, fp8=True, capability=capability)
    assert tile.num_stages == stages
    assert decode_blocks_per_sm(tile, capability) == 3
    assert select_config(256, 2, decode=True, fp8=False, capability=capability).num_stages == 2  # 8-warp BF16
    assert select_config(512, 8, decode=True, fp8=True, capability=capability).num_stages == 2


def test_split_counts_are_the_fastest_timed_on_the_h100(card):
    """Session 31, H100, 26B-A4B at 816 keys: the counts timed fastest (or within 3%) at each batch."""
    card((9, 0), 132)
    assert splits(96, 8, 816, SLIDING) == 1  # 146 us; 2 splits 156, 4 splits 160
    assert splits(112, 8, 816, SLIDING) == 3  # 182 us; 1 split 191
    assert splits(64, 8, 816, SLIDING) == 3  # 112 us; 1 split 134
    assert splits(96, 2, 816, GLOBAL) == 2  # 122 us; 1: 177, 3: 142, 4: 127
    assert splits(64, 2, 816, GLOBAL) == 3  # 87 us; 2: 101, 4: 110
    assert splits(112, 2, 816, GLOBAL) == 3  # 161 us; 2: 203, 1: 178, 7-8: 157
    assert splits(1, 2, 816, GLOBAL) >= 24  # 21 us at 24; 6 (the old rule) 34
    assert splits(1, 8, 816, SLIDING) >= 24  # 15 us at 24; 6: 18


def test_split_counts_keep_whole_tiles_and_one_wave_at_batch_one(card):
    card((8, 6), 82)  # an RTX 3090: one 8-warp global block an SM
    assert splits(1, 2, 40, GLOBAL) == 1  # under two 32-key splits
    assert splits(1, 2, 100, GLOBAL) == 3  # 32 keys a split at least
    many = splits(1, 2, 1 << 20, GLOBAL)
    assert 30 <= many and 2 * many <= 82  # the two KV heads' programs fill most of one wave of 82, no more
    for batch in range(1, 300, 7):
        assert 1 <= splits(batch, 8, 1024, SLIDING) <= 1024 // 32


def test_no_split_without_a_gpu():
    assert splits(1, 2, 1 << 20, GLOBAL) == 1
