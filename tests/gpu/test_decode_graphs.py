"""Decode CUDA graphs on the card: a replay computes what the same padded step computes eagerly.

Tiny MoE shape with random NVFP4 weights and an FP8 KV cache (the 26B-A4B shape takes a minute to build:
`nvfp4kit bench engine` runs it). Three sequences of different lengths are padded to the graph of 4; the
replay must equal the same launches run without a graph (to bf16 noise), and the padding rows stay finite.
"""

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.engine.batch_context import SeqSlice
from nvfp4kit.engine.cuda_graphs import DecodeGraphs
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny_config import tiny_text_config

pytestmark = pytest.mark.cuda


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_graph_replay_equals_the_same_launches_run_eagerly():
    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=True, device="cuda")
    config = EngineConfig(
        kv_dtype="fp8_e5m2",
        max_num_seqs=4,
        max_num_batched_tokens=2048,
        num_kv_tokens=20_000,
        graph_batch_sizes=(1, 4),
    )
    engine = Engine(model, None, config=config)
    assert engine.graphs is not None, "the engine captured no decode graphs on CUDA"
    eager = DecodeGraphs(
        model, engine.cache, batch_sizes=(4,), max_model_len=engine.max_model_len, eager=True
    )
    eager.capture()
    gen = torch.Generator().manual_seed(0)
    for n in (700, 1500, 40):
        engine.add_request(
            torch.randint(10, cfg.vocab_size, (n,), generator=gen).tolist(),
            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        )
    for _ in range(4):  # prefill all three, then decode
        engine.step()
    requests = list(engine.scheduler.running)
    assert len(requests) == 3
    with torch.inference_mode():
        for _ in range(3):
            ids = [r.all_ids[-2] for r in requests]  # recompute the last cached position (its block exists)
            seqs = [SeqSlice(len(r.all_ids) - 2, 1, i, r.block_table, r.ring) for i, r in enumerate(requests)]
            replay = engine.graphs.run(ids, seqs).clone()
            same_launches = eager.run(ids, seqs)
            assert replay.shape == same_launches.shape
            assert rel(replay, same_launches) < 1e-2
            assert torch.isfinite(engine.graphs._graphs[4].logits).all()  # the padding row too
            engine.step()
    eager.close()
    engine.close()
