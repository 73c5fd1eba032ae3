"""`LLM` on the card with CUDA graphs: prefix caching changes no token, and `close()` gives the memory back.

Tiny checkpoints (seconds); the 26B-A4B shape is `nvfp4kit bench engine`'s job. The prefix-cache test runs a dense
model in fp32 (asked for: on CUDA the default compute dtype is bf16 even for an fp32 checkpoint, which is why
sessions 6-8 saw bf16-sized chunk-boundary differences they took for an fp32 kernel error). A cached turn
prefills in other chunks, so its products take other kernels and tiles; a tiny random MoE flips near-tied
router choices on such rounding noise, so the test has no router: any token the cache changes is its fault.
"""

import gc

import pytest
import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.engine.engine import EngineConfig

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("moe", dtype=torch.bfloat16, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def fp32_dense_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("dense", dtype=torch.float32, max_position_embeddings=4096)


def conversation(llm: LLM, turns: int = 4) -> tuple[list[list[int]], int]:
    """Greedy multi-turn chat of random 150-token user turns: each turn's tokens, and the most prompt
    tokens one turn took from the prefix cache."""
    gen = torch.Generator().manual_seed(0)
    history: list[int] = [2]
    outputs, reused = [], 0
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for _ in range(turns):
        history += torch.randint(10, 300, (150,), generator=gen).tolist()
        request_id = llm.engine.add_request(list(history), params)
        tokens = []
        while llm.engine.has_unfinished():
            for event in llm.engine.step():
                if event.request_id == request_id:
                    tokens.append(event.token_id)
                    reused = max(reused, getattr(event, "cached_tokens", 0) or 0)
        outputs.append(tokens)
        history += tokens
    return outputs, reused


def test_prefix_caching_changes_no_token(fp32_dense_checkpoint):
    results = {}
    for cache in (True, False):
        config = EngineConfig(prefix_caching=cache, max_num_batched_tokens=128)
        # dtype given: on CUDA the default compute dtype is bf16 whatever the checkpoint holds
        with LLM(
            fp32_dense_checkpoint, dtype=torch.float32, device="cuda", engine_config=config,
            gpu_memory_utilization=0.3,
        ) as llm:  # fmt: skip
            assert llm.engine.graphs is not None
            results[cache] = conversation(llm)
    assert results[True][0] == results[False][0]
    assert results[True][1] > 0, "no turn reused the KV of the turns before"
    assert results[False][1] == 0


def test_close_returns_the_memory_and_a_second_llm_gives_the_same_tokens(bf16_checkpoint):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    gc.collect()
    before = torch.cuda.memory_allocated()
    llm = LLM(bf16_checkpoint, device="cuda", gpu_memory_utilization=0.5)
    first = llm.generate("Hello", params)[0].token_ids
    assert torch.cuda.memory_allocated() > before
    llm.close()
    after_close = torch.cuda.memory_allocated()
    with LLM(bf16_checkpoint, device="cuda", gpu_memory_utilization=0.5) as again:
        second = again.generate("Hello", params)[0].token_ids
    del again
    gc.collect()
    # what may stay: the kernels' per-device split-K arrival counters (16 KiB, made once per process)
    slack = 1 << 20
    assert after_close - before <= slack
    assert torch.cuda.memory_allocated() - before <= slack
    assert first == second
