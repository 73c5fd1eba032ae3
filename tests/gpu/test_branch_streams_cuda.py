"""The dense MLP beside the experts on a second CUDA stream (model/branches.py) changes no number.

Tiny MoE shape with random NVFP4 weights (split-K linears, split-mode MoE, the fused router), FP8 KV, decode CUDA
graphs: the same prompts decoded greedily with one stream and with two must give the same tokens and bitwise the
same logprobs, in graph replays (decode) and eagerly (prefill, mixed steps). Run twice, one stream also checks
that a run is deterministic (the split-K partials are summed in a fixed order whichever program arrives last).
"""

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.branches import set_branch_streams
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny_config import tiny_text_config

pytestmark = pytest.mark.cuda


def decode(model, prompts: list[list[int]]) -> list[list[tuple[int, float]]]:
    config = EngineConfig(
        kv_dtype="fp8_e5m2", max_num_seqs=4, max_num_batched_tokens=256, num_kv_tokens=20_000
    )
    engine = Engine(model, None, config=config)
    assert engine.graphs is not None
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[int, list[tuple[int, float]]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append((event.token_id, event.logprob))
    engine.close()
    return [out[i] for i in ids]


def test_two_streams_give_bitwise_the_same_tokens_and_logprobs():
    cfg = config_from_dict(tiny_text_config("moe"))
    model = random_model(cfg, quantized=True, device="cuda")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 300, 77)]
    try:
        set_branch_streams(False)
        one = decode(model, prompts)
        again = decode(model, prompts)
        set_branch_streams(True)
        two = decode(model, prompts)
    finally:
        set_branch_streams(None)
    assert one == again, "one stream, two runs: different numbers"
    assert two == one
