"""Admission batching: prompts that arrive while many requests decode wait a few steps to share one prefill step.

A step that prefills runs eagerly and costs about the same for one prompt or several on a big GPU, so the
scheduler holds a new prompt back up to `admission_delay` steps while `admission_min_running` requests run. These
tests pin when a prompt is admitted (after the delay, at once when little runs or enough tokens wait) and that the
policy moves only timing: every request's greedy tokens are the same with and without it.
"""

from __future__ import annotations

import dataclasses

import pytest

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.request import Status
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams

from .helpers import random_prompts

LONG = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint("moe"))


def _engine(
    model, *, overlap: bool = False, delay: int = 3, min_running: int = 2, tokens: int = 1000
) -> Engine:
    engine = Engine(
        model,
        None,
        config=EngineConfig(max_num_batched_tokens=64, admission_delay=delay, overlap_schedule=overlap),
    )
    engine.scheduler.config = dataclasses.replace(
        engine.scheduler.config, admission_min_running=min_running, admission_tokens=tokens
    )
    return engine


def _decoding(engine: Engine, count: int) -> list[str]:
    """`count` requests started and past their prefill."""
    ids = [engine.add_request(p, LONG) for p in random_prompts([9] * count, seed=1)]
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()
    return ids


def _steps_until_admitted(engine: Engine, request_id: str, limit: int = 12) -> int:
    request = engine.requests[request_id]
    for steps in range(limit):
        if request.status is not Status.WAITING:
            return steps
        engine.step()
    raise AssertionError(f"not admitted within {limit} steps")


@pytest.mark.parametrize("overlap", [False, True], ids=["host", "overlap"])
def test_a_prompt_arriving_while_others_decode_waits_the_delay(model, overlap):
    engine = _engine(model, overlap=overlap, delay=3)
    _decoding(engine, 2)
    late = engine.add_request(random_prompts([7], seed=2)[0], LONG)
    # three steps held back, then it joins the fourth (with overlap too: each step asks once)
    assert _steps_until_admitted(engine, late) == 4
    assert engine.overlapped_steps > 0 if overlap else engine.overlapped_steps == 0


def test_no_waiting_when_few_requests_run(model):
    engine = _engine(model, delay=5, min_running=3)
    _decoding(engine, 2)
    late = engine.add_request(random_prompts([7], seed=2)[0], LONG)
    assert _steps_until_admitted(engine, late) == 1


def test_no_waiting_when_enough_prompt_tokens_wait(model):
    engine = _engine(model, delay=5, tokens=12)
    _decoding(engine, 2)
    late = [engine.add_request(p, LONG) for p in random_prompts([7, 7], seed=3)]
    assert _steps_until_admitted(engine, late[0]) == 1
    assert engine.requests[late[1]].status is not Status.WAITING


def test_two_prompts_arriving_steps_apart_share_one_prefill_step(model):
    engine = _engine(model, delay=4)
    _decoding(engine, 2)
    first = engine.add_request(random_prompts([7], seed=4)[0], LONG)
    engine.step()
    second = engine.add_request(random_prompts([8], seed=5)[0], LONG)
    while engine.requests[first].status is Status.WAITING:
        engine.step()
    assert engine.requests[second].status is not Status.WAITING
    assert engine.step_stats.steps["prefill"] == 1 + 1  # the decoders' prefill, then both together


def test_admission_batching_changes_no_token(model):
    prompts = random_prompts([9, 11, 7, 13, 8], seed=6)
    results = []
    for delay in (0, 3):
        engine = _engine(model, delay=delay)
        ids = [engine.add_request(p, LONG, request_id=f"r{i}") for i, p in enumerate(prompts[:2])]
        arrivals = {2: prompts[2], 4: prompts[3], 5: prompts[4]}  # prompts joining at these steps
        tokens: dict[str, list[int]] = {}
        step = 0
        while engine.has_unfinished() or arrivals:
            if step in arrivals:
                ids.append(engine.add_request(arrivals.pop(step), LONG, request_id=f"r{len(ids)}"))
            for event in engine.step():
                tokens.setdefault(event.request_id, []).append(event.token_id)
            step += 1
        results.append(tokens)
    assert results[0] == results[1]
    assert all(len(t) == LONG.max_tokens for t in results[1].values())


def test_admission_tokens_default_to_a_whole_step_and_follow_the_config(model):
    default = Engine(model, None, config=EngineConfig(max_num_batched_tokens=64))
    assert default.scheduler.config.admission_tokens == 64
    chosen = Engine(model, None, config=EngineConfig(max_num_batched_tokens=64, admission_tokens=12))
    assert chosen.scheduler.config.admission_tokens == 12
