"""The overlap scheduler on a CUDA GPU (`cuda` marker: skipped without one): real graph replays fed from device
tokens, pinned copies and events. On the card:
`PYTHONPATH=src python3 -m pytest -m cuda -q tests/engine/test_overlap_cuda.py`.

Every decode step pads to one captured batch size (8), so each row meets the same kernel shapes whatever the
other rows do, and the tokens can be compared exactly between overlap on and off.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import random_prompts
from .test_overlap import _all_free, _greedy, _run

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_parts(tiny_checkpoint):
    folder = tiny_checkpoint("moe", dtype=torch.bfloat16)
    return load_model(folder, device="cuda"), Tokenizer(folder)


def _engine(parts, overlap: bool, **config) -> Engine:
    config = {"max_num_seqs": 8, "graph_batch_sizes": (8,), "max_num_batched_tokens": 64, **config}
    return Engine(*parts, config=EngineConfig(overlap_schedule=overlap, **config))


def test_graph_replays_fed_from_device_tokens_give_the_synchronous_tokens(cuda_parts):
    prompts = random_prompts([7, 12, 5, 9, 16, 6], seed=11)
    jobs = [
        (prompts[0], _greedy(10, stop_token_ids=(5, 6, 7))),
        (prompts[1], _greedy(12)),
        (prompts[2], _greedy(3)),
        (prompts[3], SamplingParams(max_tokens=9, temperature=0.9, top_k=20, seed=5, ignore_eos=True)),
        (prompts[4], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=6, logprobs=2)),
        (prompts[5], _greedy(8, logprobs=1, min_tokens=4)),
    ]
    # no admissions mid-decode here: a mixed prefill + decode step runs eagerly at a size that differs with
    # the overlap (the CPU tests check that logic; bf16 kernels need not give a row the same bits at any size)
    actions = {("r1", 4): lambda engine: engine.abort("r1")}
    sync = _engine(cuda_parts, False)
    expected = _run(sync, jobs, actions=actions)
    engine = _engine(cuda_parts, True)
    assert engine.graphs is not None
    assert _run(engine, jobs, actions=actions) == expected
    assert engine.overlapped_steps > 0 and _all_free(engine) and _all_free(sync)


def test_eager_decode_steps_on_cuda(cuda_parts):
    prompts = random_prompts([14, 12, 10, 9], seed=3)
    jobs = [(p, _greedy(12)) for p in prompts]  # the same four rows every step, with and without overlap
    expected = _run(_engine(cuda_parts, False, cuda_graphs=False), jobs)
    engine = _engine(cuda_parts, True, cuda_graphs=False)
    assert _run(engine, jobs) == expected and engine.overlapped_steps > 0 and _all_free(engine)


def test_step_timer_measures_device_time_per_decode_step(cuda_parts):
    """Every decode step launched is device-timed into step_stats, each below the wall time its steps took."""
    engine = _engine(cuda_parts, True)
    engine.add_request(random_prompts([20])[0], _greedy(12))
    while engine.has_unfinished():
        engine.step()
    engine.collect_step_times(wait=True)
    stats = engine.step_stats
    assert stats.device_steps["decode_graph"] == stats.steps["decode_graph"] >= 10
    assert 0 < stats.device_seconds["decode_graph"] < stats.seconds["decode_graph"]
