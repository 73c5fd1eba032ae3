"""Prefill steps replayed from CUDA graphs on the card give the tokens of the eager engine.

A dense fp32 tiny model (no router whose near-ties rounding noise could flip, see test_llm_on_cuda.py), prompts
longer than a step's budget so that chunks of later prompts run beside the decodes of earlier ones: the steps
that prefill replay the captured graphs (padded to 32 or 64 tokens), and every request's greedy tokens match an
engine without them.
"""

import pytest
import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.engine.engine import EngineConfig

pytestmark = pytest.mark.cuda


def test_prefill_graphs_give_the_eager_tokens(tiny_checkpoint):
    folder = tiny_checkpoint("dense", dtype=torch.float32, max_position_embeddings=4096)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 300, (n,), generator=gen).tolist() for n in (40, 30, 90, 20, 61)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    results, kinds = [], []
    for graphs in ((), (32, 64)):
        config = EngineConfig(max_num_batched_tokens=64, prefill_graphs=graphs, prefix_caching=False)
        with LLM(
            folder, dtype=torch.float32, device="cuda", engine_config=config, gpu_memory_utilization=0.3
        ) as llm:
            assert (llm.engine.prefill_graphs is not None) == bool(graphs)
            results.append([out.token_ids for out in llm.generate([list(p) for p in prompts], params)])
            kinds.append(dict(llm.engine.step_stats.steps))
    assert results[0] == results[1]
    assert kinds[1]["prefill_graph"] > 0 and kinds[1]["prefill"] < kinds[0]["prefill"]
