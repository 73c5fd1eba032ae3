"""The split rules and sharded loading, in one process (no process group needed to load a shard)."""

import pytest
import torch

from nvfp4kit.config import load_config, load_preset
from nvfp4kit.distributed.loading import load_shard
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.layers import stored_weight
from nvfp4kit.model.loader import load_model
from nvfp4kit.plan.parallel import ParallelLayout, ShardingError, checkpoint_rank_bytes, parallel_plan


def test_rules_on_the_26b_a4b_shape():
    cfg = load_preset("gemma-4-26b-a4b")
    two = ParallelLayout(cfg, 2).check(nvfp4=True)
    local = two.local_config()
    assert local.num_attention_heads == cfg.num_attention_heads // 2
    assert local.num_key_value_heads == cfg.num_key_value_heads // 2
    assert local.num_global_key_value_heads == cfg.num_global_key_value_heads // 2
    assert local.num_experts == cfg.num_experts  # the router still scores every expert
    assert [len(two.expert_range(r)) for r in range(2)] == [cfg.num_experts // 2] * 2
    # more ranks than global KV heads: each rank holds the one its q heads read
    four = ParallelLayout(cfg, 4).check(nvfp4=True)
    glob = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
    assert four.replicates_kv(glob) and four.kv_heads(glob) == 1
    per = 4 // cfg.num_global_key_value_heads
    assert [four.kv_head_range(glob, r) for r in range(4)] == [(r // per, r // per + 1) for r in range(4)]


def test_uneven_experts_and_vocab_are_split_unevenly():
    layout = ParallelLayout(load_config_like(num_experts=8, vocab_size=384), 3)
    assert [list(layout.expert_range(r)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [len(layout.vocab_range(r)) for r in range(3)] == [128, 128, 128]
    odd = ParallelLayout(load_config_like(num_experts=8, vocab_size=385), 3)
    assert [len(odd.vocab_range(r)) for r in range(3)] == [129, 129, 127]


def load_config_like(**changes):
    from nvfp4kit.config import config_from_dict
    from nvfp4kit.testing.tiny import tiny_text_config

    return config_from_dict(tiny_text_config("moe", num_attention_heads=6, num_key_value_heads=3, **changes))


def test_refusals_name_every_size_that_does_not_split(split_checkpoint):
    cfg = load_config(split_checkpoint("moe"))  # 4 q heads, 2 sliding KV heads, 1 global KV head
    with pytest.raises(ShardingError, match="4 attention heads do not split evenly over 3 ranks") as err:
        ParallelLayout(cfg, 3).check(nvfp4=False)
    assert "2 sliding-layer KV heads" in str(err.value)
    # BF16 may cut the MLP's input columns anywhere; NVFP4 only at multiples of the 16-element block
    narrow = cfg.with_(intermediate_size=48)
    ParallelLayout(narrow, 2).check(nvfp4=False)
    with pytest.raises(ShardingError, match=r"48 / 2 ranks = 24 is not a multiple of the NVFP4 block \(16\)"):
        ParallelLayout(narrow, 2).check(nvfp4=True)
    with pytest.raises(ShardingError, match="8 experts cannot give each of 16 ranks one"):
        ParallelLayout(cfg.with_(num_attention_heads=16), 16).check(nvfp4=False)


@pytest.mark.parametrize("nvfp4", [False, True])
def test_a_rank_reads_only_its_shard(split_checkpoint, nvfp4):
    folder = split_checkpoint("moe", nvfp4)
    cfg = load_config(folder)
    layout = ParallelLayout(cfg, 2).check(nvfp4=nvfp4)
    full = load_model(folder)
    tensors = CheckpointReader(folder).tensors.values()
    expected = checkpoint_rank_bytes(layout, tensors, prefix=cfg.weight_prefix)
    total = sum(t.nbytes for t in tensors)
    for rank in range(2):
        shard = load_shard(folder, layout, rank)
        assert shard.bytes_read == expected[rank]
        assert shard.bytes_read < 0.6 * total  # replicated norms and routers are all that is read twice
        attn, ref = shard.layers[0].self_attn, full.layers[0].self_attn
        assert attn.num_heads == 2 and attn.num_kv_heads == 1
        q_rows = 2 * attn.head_dim
        got, want = stored_weight(attn.qkv_proj, "weight"), stored_weight(ref.qkv_proj, "weight")
        if nvfp4:  # packed bytes and block scales are the same rows of the full weight; scale_2 shared
            assert isinstance(got, NVFP4Tensor)
            assert torch.equal(got.packed[:q_rows], want.packed[rank * q_rows : (rank + 1) * q_rows])
            assert torch.equal(got.scale_2, want.scale_2)
            down, down_ref = (
                stored_weight(shard.layers[0].mlp.down_proj, "weight"),
                stored_weight(full.layers[0].mlp.down_proj, "weight"),
            )
            cols = down.scale.shape[1]
            assert torch.equal(
                down.scale.view(torch.uint8),
                down_ref.scale.view(torch.uint8)[:, rank * cols : (rank + 1) * cols],
            )
        else:
            assert torch.equal(got[:q_rows], want[rank * q_rows : (rank + 1) * q_rows])
        experts = shard.layers[0].experts
        assert (experts.first, experts.count) == (4 * rank, 4)
        assert shard.embed_tokens.shape[0] == cfg.vocab_size // 2
        assert torch.equal(shard.embed_tokens, full.embed_tokens[rank * 192 : (rank + 1) * 192])


def test_plan_shows_per_gpu_bytes():
    one = parallel_plan("26b-a4b", 1, free_bytes=22 * 2**30)
    two = parallel_plan("26b-a4b", 2, free_bytes=22 * 2**30)
    assert two["kv_bytes_per_token"]["global"] * 2 == one["kv_bytes_per_token"]["global"]
    assert two["kv_bytes_per_token"]["sliding"] * 2 == one["kv_bytes_per_token"]["sliding"]
    # everything but the replicated norms and routers halves
    assert 0.5 < two["weights_per_rank"][0] / one["weights_per_rank"][0] < 0.52
    assert two["global_tokens"] > 2 * one["global_tokens"]  # half the KV a token, and more room for it


@pytest.mark.parametrize(
    ("name", "nvfp4", "ranks", "moe"),
    [
        ("moe", True, 2, "experts"),
        ("moe3", False, 3, "experts"),
        ("moe", True, 2, "tensor"),
        ("moe", False, 2, "tensor"),
    ],
)
def test_cutting_a_loaded_model_gives_the_shard_loading_gives(split_checkpoint, name, nvfp4, ranks, moe):
    """Both ways to a shard agree: per-expert (NVFP4) and fused (fp32) expert layouts, either MoE split."""
    from nvfp4kit.distributed.slicing import shard_model

    folder = split_checkpoint(name, nvfp4)
    layout = ParallelLayout(load_config(folder), ranks, moe).check(nvfp4=nvfp4)
    full = load_model(folder)
    for rank in range(ranks):
        cut, loaded = (
            shard_model(full, layout, rank).state_dict(),
            load_shard(folder, layout, rank).state_dict(),
        )
        assert cut.keys() == loaded.keys()
        for key, tensor in loaded.items():
            same = cut[key].view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else cut[key]
            want = tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor
            assert torch.equal(same, want), key


def test_plan_command_prints_the_per_gpu_block(capsys, split_checkpoint):
    import json

    from nvfp4kit.cli import main

    assert main(["plan", "26b-a4b", "--gpu", "RTX 3090", "--tensor-parallel-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "Per GPU with --tensor-parallel-size 2" in text and "experts per GPU: 64, 64" in text
    assert main(["plan", str(split_checkpoint("moe3", True)), "-tp", "3", "--json"]) == 0
    per_gpu = json.loads(capsys.readouterr().out)["tensor_parallel"]
    assert per_gpu["experts_per_rank"] == [3, 3, 2] and per_gpu["kv_replicated"] == ["global"]
    assert per_gpu["weights_per_rank"][2] < per_gpu["weights_per_rank"][0]  # one expert fewer a layer
