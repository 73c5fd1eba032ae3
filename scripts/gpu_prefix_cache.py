"""GPU check for prefix caching: multi-turn greedy chats give the same tokens with the cache on and off (CUDA
graphs on), and the later turns reuse cached tokens. Usage: PYTHONPATH=src python scripts/gpu_prefix_cache.py"""

import sys
import tempfile

import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.engine.engine import EngineConfig
from nvfp4kit.testing.tiny import write_tiny_checkpoint


def conversation(llm: LLM, turns: int = 4) -> tuple[list[list[int]], int]:
    gen = torch.Generator().manual_seed(0)
    history: list[int] = [2]
    outs, reused = [], 0
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
        outs.append(tokens)
        history += tokens
    return outs, reused


def main() -> int:
    folder = write_tiny_checkpoint(
        tempfile.mkdtemp(), shape="moe", dtype=torch.bfloat16, max_position_embeddings=4096
    )
    results = {}
    for cache in (True, False):
        config = EngineConfig(prefix_caching=cache, max_num_batched_tokens=128)
        with LLM(folder, device="cuda", engine_config=config, gpu_memory_utilization=0.3) as llm:
            results[cache] = conversation(llm)
    same = results[True][0] == results[False][0]
    print(
        f"tokens equal with and without the cache: {same}; most tokens reused by a turn: {results[True][1]}"
    )
    return 0 if same and results[True][1] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
