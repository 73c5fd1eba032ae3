"""Shared by the engine tests: random prompts and running an engine until every request is done."""

from __future__ import annotations

import torch

from nvfp4kit.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 384, (n,), generator=gen).tolist() for n in lengths]


def generate_tokens(engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Add every prompt, step until all finish; the generated token ids per prompt, in order."""
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    out: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for event in engine.step():
            out[ids[event.request_id]].append(event.token_id)
    return out
