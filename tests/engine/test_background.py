"""Background requests (the server's chat history warm-ups) take only what the clients' requests leave: a client's
prompt is never computed in a step beside a background prefill chunk, is admitted before background requests
queued ahead of it, never waits for a background request it does not need, and is never preempted for one. The
greedy tokens of every request stay those computed alone."""

import dataclasses

import pytest

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.request import Status
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import random_prompts
from .test_engine import reference_greedy
from .test_prefix_cache import check_references

WARM = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)  # as serve/history_warmup.py asks
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    return load_model(folder), Tokenizer(folder)


class Run:
    """Steps an engine, keeping each request's tokens and the step of its first token."""

    def __init__(self, engine):
        self.engine, self.out, self.first, self.steps = engine, {}, {}, 0

    def step(self, record=None, check=None) -> None:
        """One step; `record(computed_before)` after it, with each request's num_computed before it."""
        self.steps += 1
        before = {rid: req.num_computed for rid, req in self.engine.requests.items()}
        for event in self.engine.step():
            self.out.setdefault(event.request_id, []).append(event.token_id)
            self.first.setdefault(event.request_id, self.steps)
        if record:
            record(before)
        if check:
            check(self.engine)

    def finish(self, record=None, check=None) -> None:
        while self.engine.has_unfinished():
            self.step(record, check)


def test_a_clients_prompt_does_not_share_its_steps_with_a_background_prefill(setup):
    model, tok = setup
    warm_prompt, prompt = random_prompts([40, 20], seed=81)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16, block_size=4))
    run = Run(engine)
    warm = engine.add_request(warm_prompt, WARM, background=True)
    run.step()  # its first chunk
    client = engine.add_request(prompt, GREEDY)
    reqs = {rid: engine.requests[rid] for rid in (warm, client)}
    shared = []

    def record(before):
        moved = {rid for rid, req in reqs.items() if req.num_computed > before.get(rid, req.num_computed)}
        if client in moved and reqs[client].num_computed <= len(prompt):  # a step with the client's prompt
            shared.append(warm in moved)

    run.finish(record)
    assert shared == [False, False]  # its two chunks, each in a step of its own
    assert run.first[client] == 1 + 2  # from the step after it arrived
    assert run.first[warm] == run.first[client] + 2  # the rest of the warm-up, beside the client's decodes
    assert run.out[client] == reference_greedy(model, prompt, GREEDY.max_tokens)
    assert run.out[warm] == reference_greedy(model, warm_prompt, 1)


def test_beside_clients_decodes_a_background_chunk_keeps_the_step_short(setup):
    """The clients' next tokens wait for the whole step: a background prefill chunk beside their decodes fills the
    step only up to `background_step_tokens`; alone it takes the full budget."""
    model, tok = setup
    prompt, warm_prompt = random_prompts([6, 60], seed=86)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16, block_size=4))
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, background_step_tokens=6)
    run = Run(engine)
    decoding = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    client = engine.add_request(prompt, decoding)
    run.step()  # the client's prompt
    warm = engine.add_request(warm_prompt, WARM, background=True)
    reqs = {rid: engine.requests[rid] for rid in (warm, client)}
    steps = []

    def record(before):
        steps.append({rid: req.num_computed - before[rid] for rid, req in reqs.items() if rid in before})

    run.finish(record)
    beside = [s[warm] for s in steps if s.get(client, 0) == 1 and s.get(warm, 0) > 0]
    alone = [s[warm] for s in steps if not s.get(client) and s.get(warm, 0) > 1]
    assert beside == [5] * 7  # the client's 7 decodes, each beside 5 of the warm-up's tokens
    assert alone == [16, 9]  # then the other 25 at the full budget
    assert run.out[client] == reference_greedy(model, prompt, 8)
    assert run.out[warm] == reference_greedy(model, warm_prompt, 1)


def test_a_background_request_waits_for_the_clients_queued_after_it(setup):
    model, tok = setup
    warm_prompt, short, long = random_prompts([12, 8, 40], seed=82)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16, block_size=4))
    run = Run(engine)
    warm = engine.add_request(warm_prompt, WARM, background=True)
    clients = [engine.add_request(p, GREEDY) for p in (short, long)]
    run.step()
    # first in the queue and small enough to share the budget, yet the clients' prompts go first
    assert engine.requests[warm].status is Status.WAITING
    assert all(engine.requests[c].status is Status.RUNNING for c in clients)
    assert engine.stats()["waiting"] == 0 and engine.stats()["background"] == 1
    run.finish()
    # the long prompt took the budget the short one's decodes left (8 + 15 + 15 + 2): the warm-up came next
    assert run.first[clients[1]] == 4 and run.first[warm] == 5
    assert run.out[warm] == reference_greedy(model, warm_prompt, 1)
    assert [run.out[c] for c in clients] == [
        reference_greedy(model, p, GREEDY.max_tokens) for p in (short, long)
    ]


def test_a_turn_that_extends_a_running_warm_up_shares_its_prefill(setup):
    """A chat's next turn that arrives while its history is warmed waits for that prefill as its twin, shares its
    blocks, and makes it a client's request: another client's prefill no longer holds it back."""
    model, tok = setup
    history, tail, other = random_prompts([30, 9, 40], seed=83)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16, block_size=4))
    run = Run(engine)
    warm = engine.add_request(history, WARM, background=True)
    run.step()  # the warm-up's first 16 tokens
    turn, rival = engine.add_request(history + tail, GREEDY), engine.add_request(other, GREEDY)
    warm_req, rival_req = engine.requests[warm], engine.requests[rival]
    run.step()
    assert warm_req.num_computed == 30 and rival_req.num_computed == 2  # the warm-up went first
    assert not warm_req.background
    run.finish(check=check_references)
    assert run.out[warm] == reference_greedy(model, history, 1)
    assert run.out[turn] == reference_greedy(model, history + tail, GREEDY.max_tokens)
    assert run.out[rival] == reference_greedy(model, other, GREEDY.max_tokens)
    assert engine.scheduler.prefix.hit_tokens == 28  # the history's full blocks, computed once
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_under_kv_pressure_the_background_request_is_preempted(setup):
    model, tok = setup
    warm_prompt, prompt = random_prompts([8, 8], seed=84)
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    # 12 blocks of 4 tokens: each request needs 10 by its last token
    config = EngineConfig(max_num_batched_tokens=16, num_kv_tokens=48, block_size=4, max_num_seqs=4)
    engine = Engine(model, tok, config=config)
    run = Run(engine)
    warm = engine.add_request(warm_prompt, long, background=True)
    run.step()
    client = engine.add_request(prompt, long)  # the newer one: the victim, were it not a client's
    reqs = (engine.requests[warm], engine.requests[client])
    run.finish(check=check_references)
    assert reqs[0].preemptions > 0 and reqs[1].preemptions == 0
    assert run.out[client] == reference_greedy(model, prompt, 30)
    assert run.out[warm] == reference_greedy(model, warm_prompt, 30)


def test_a_client_takes_the_ring_of_a_background_request(setup):
    """No free sliding ring: a client's request preempts a running background request for its ring."""
    model, tok = setup
    warm_prompt, prompt = random_prompts([8, 8], seed=85)
    long = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16, block_size=4, max_num_seqs=1))
    run = Run(engine)
    warm = engine.add_request(warm_prompt, long, background=True)
    run.step()
    client, warm_req = engine.add_request(prompt, GREEDY), engine.requests[warm]
    run.finish(check=check_references)
    assert run.first[client] == 2 and warm_req.preemptions == 1 and engine.stats()["preemptions"] == 1
    assert run.out[client] == reference_greedy(model, prompt, GREEDY.max_tokens)
    assert run.out[warm] == reference_greedy(model, warm_prompt, 20)
