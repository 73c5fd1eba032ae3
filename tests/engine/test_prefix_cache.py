"""Prefix caching: requests that share a beginning reuse its KV (global blocks and the sliding window), and the
greedy tokens are the ones computed without the cache, at block and window boundaries, across turns of a
conversation, under preemption and eviction."""

import pytest
import torch

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import random_prompts
from .test_engine import reference_greedy

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["moe", "e2b"])
def setup(request, tiny_checkpoint):
    folder = tiny_checkpoint(request.param)
    return load_model(folder), Tokenizer(folder)


def run(engine, prompts, params=GREEDY, check=None):
    """Each prompt after the previous one finished; (tokens, cached prompt tokens) per prompt."""
    results = []
    for prompt in prompts:
        rid, tokens, cached = engine.add_request(prompt, params), [], None
        while engine.has_unfinished():
            for event in engine.step():
                assert event.request_id == rid
                tokens.append(event.token_id)
                cached = event.cached_tokens if cached is None else cached
            if check:
                check(engine)
        results.append((tokens, cached))
    return results


def check_references(engine) -> None:
    """Every block is referenced exactly by the running requests that hold it; free ones by none."""
    prefix = engine.scheduler.prefix
    holders = [0] * engine.layout.num_blocks
    for req in engine.scheduler.running:
        for block in req.block_table:
            holders[block] += 1
    assert holders == prefix.refs
    free = [*prefix.free_blocks.plain, *prefix.free_blocks.cached]
    assert len(set(free)) == len(free) and all(prefix.refs[b] == 0 for b in free)
    assert len(free) + sum(1 for n in holders if n) == engine.layout.num_blocks


@pytest.mark.parametrize("block_size,chunk", [(4, 16), (16, 64), (8, 12)])
def test_shared_beginnings_around_block_and_window_boundaries(setup, block_size, chunk):
    model, tok = setup
    base = random_prompts([48], seed=11)[0]
    tails = random_prompts([5] * 14, seed=12)
    lengths = [3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48]
    prompts = [base[:n] + tail for n, tail in zip(lengths, tails)]
    prompts.append(list(prompts[-1]))  # a repeat
    config = EngineConfig(max_num_batched_tokens=chunk, block_size=block_size)
    engine = Engine(model, tok, config=config)
    results = run(engine, prompts, check=check_references)
    assert [tokens for tokens, _ in results] == [
        reference_greedy(model, p, GREEDY.max_tokens) for p in prompts
    ]
    cached = [c for _, c in results]
    assert all(c % block_size == 0 and c < len(p) for c, p in zip(cached, prompts))
    # a repeat: all but the last token, block-aligned, if the previous ring (the last window + chunk positions
    # of prompt + output) still holds the window before that point
    m, end = (len(prompts[-1]) - 1) // block_size * block_size, len(prompts[-1]) + GREEDY.max_tokens - 1
    window = model.config.sliding_window
    assert cached[-1] == (m if m - window + 1 >= end - (window + chunk) else 0)
    assert sum(cached) > 0 and engine.scheduler.prefix.hit_tokens == sum(cached)
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks
    assert len(engine.cache.free_rings) == engine.layout.max_seqs


@pytest.mark.parametrize("chunk", [16, 3])
def test_conversation_turns_reuse_the_history(setup, chunk):
    model, tok = setup
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=chunk, block_size=4))
    history = random_prompts([13], seed=21)[0]
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    for turn, message in enumerate(random_prompts([6, 9, 4, 11], seed=22)):
        prompt = history + message
        ((tokens, cached),) = run(engine, [prompt], params)
        assert tokens == reference_greedy(model, prompt, 7)
        if turn:  # everything the last request computed (prompt + reply but its last token), block-aligned
            assert cached == (len(history) - 1) // 4 * 4
        history = prompt + tokens


def test_a_turn_without_the_last_reply_finds_the_prompts_window(setup):
    """A thinking chat: the template drops the reply's thought, so the next turn shares only the previous prompt.
    A reply longer than the ring's spare slots has pushed that prompt's window out of the ring parked at release;
    the ring copied at the prompt's end (`PrefixCache.snapshot`) still serves it, exactly."""
    model, tok = setup
    config = EngineConfig(max_num_batched_tokens=8, block_size=4)  # rings of window + 8
    engine = Engine(model, tok, config=config)
    long_reply = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    first, message = random_prompts([22, 7], seed=31)
    run(engine, [first], long_reply)
    ((tokens, cached),) = run(engine, [first + message], GREEDY, check=check_references)
    assert cached == 20  # block-aligned, the last prompt token before the new message included
    assert tokens == reference_greedy(model, first + message, GREEDY.max_tokens)
    short = Engine(
        model, tok, config=config
    )  # a reply within the spare slots: no copy, the released ring serves
    run(short, [first], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(short.cache.free_rings.parked) == 1
    assert len(engine.cache.free_rings) == engine.layout.max_seqs


def test_preemption_and_eviction_under_a_small_pool(setup):
    model, tok = setup
    base = random_prompts([20], seed=31)[0]
    prompts = [base[:n] + t for n, t in zip([20, 12, 16, 20, 8], random_prompts([4, 9, 2, 6, 3], seed=32))]
    config = EngineConfig(max_num_batched_tokens=16, num_kv_tokens=48, block_size=4, max_num_seqs=3)
    engine = Engine(model, tok, config=config)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    out = [[] for _ in prompts]
    while engine.has_unfinished():
        for event in engine.step():
            out[ids[event.request_id]].append(event.token_id)
        check_references(engine)
    assert out == [reference_greedy(model, p, 10) for p in prompts]
    assert engine.stats()["preemptions"] > 0 and engine.scheduler.prefix.hit_tokens > 0
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_off_computes_everything(setup):
    model, tok = setup
    engine = Engine(model, tok, config=EngineConfig(block_size=4, prefix_caching=False))
    prompt = random_prompts([20], seed=41)[0]
    results = run(engine, [prompt, prompt])
    assert [c for _, c in results] == [0, 0] and results[0][0] == results[1][0]


def test_greedy_chat_is_the_same_with_and_without_the_cache():
    from nvfp4kit import LLM

    params = SamplingParams(max_tokens=12, temperature=0)
    replies = {}
    for caching in (True, False):
        llm = LLM(engine_config=EngineConfig(prefix_caching=caching))
        messages, texts = [], []
        for question in ("What is 47 + 38?", "And times 2?", "Write a haiku about it."):
            messages.append({"role": "user", "content": question})
            (out,) = llm.chat(messages, params, use_tqdm=False)
            texts.append(out.token_ids)
            messages.append({"role": "assistant", "content": out.text})
        replies[caching] = texts
        if caching:
            assert llm.engine.scheduler.prefix.hit_tokens > 0
        llm.close()
    assert replies[True] == replies[False]
    torch.manual_seed(0)


@pytest.mark.parametrize("length,chunk", [(37, 16), (12, 64), (40, 5)])
def test_identical_prompts_together_are_prefilled_once(setup, length, chunk):
    """n > 1 (the server adds one request per choice): the first prefills, the others wait for it and take
    its full blocks and a copy of its ring, computing only the last partial block."""
    model, tok = setup
    prompt = random_prompts([length], seed=51)[0]
    outputs = {}
    for caching in (True, False):
        config = EngineConfig(max_num_batched_tokens=chunk, block_size=4, prefix_caching=caching)
        engine = Engine(model, tok, config=config)
        params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in range(3)]
        params.append(SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        ids = {engine.add_request(prompt, p): i for i, p in enumerate(params)}
        out = [[] for _ in params]
        while engine.has_unfinished():
            for event in engine.step():
                out[ids[event.request_id]].append(event.token_id)
            if caching:
                check_references(engine)
        outputs[caching] = out
        if caching:
            assert engine.scheduler.prefix.hit_tokens == 3 * ((length - 1) // 4 * 4)
            assert len(engine.cache.free_blocks) == engine.layout.num_blocks
    assert outputs[True] == outputs[False]
    assert outputs[True][3] == reference_greedy(model, prompt, 8)


@pytest.mark.parametrize("length,chunk", [(30, 16), (30, 64), (9, 5)])
def test_a_prompt_that_extends_a_running_one_shares_its_prefill(setup, length, chunk):
    """A chat's next turn sent while the server still warms the history it extends (serve/history_warmup.py):
    it waits for that prefill and takes its full blocks instead of computing them alongside it."""
    model, tok = setup
    base, tail = random_prompts([length, 9], seed=61)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=chunk, block_size=4))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first, second = engine.add_request(base, params), engine.add_request(base + tail, params)
    out, cached = {first: [], second: []}, {}
    while engine.has_unfinished():
        for event in engine.step():
            out[event.request_id].append(event.token_id)
            cached.setdefault(event.request_id, event.cached_tokens)
        check_references(engine)
    assert out[first] == reference_greedy(model, base, 6)
    assert out[second] == reference_greedy(model, base + tail, 6)
    assert cached == {first: 0, second: length // 4 * 4}
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_requests_behind_a_waiting_twin_are_admitted(setup):
    """A request that waits for its twin's prefill does not hold back the unrelated requests queued after it."""
    model, tok = setup
    base, tail, other = random_prompts([30, 9, 9], seed=71)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=64, block_size=4))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in (base, base + tail, other)]
    first_step, out, step = {}, {rid: [] for rid in ids}, 0
    while engine.has_unfinished():
        step += 1
        for event in engine.step():
            out[event.request_id].append(event.token_id)
            first_step.setdefault(event.request_id, step)
        check_references(engine)
    assert [out[rid] for rid in ids] == [reference_greedy(model, p, 4) for p in (base, base + tail, other)]
    assert (
        first_step[ids[2]] == first_step[ids[0]] < first_step[ids[1]]
    )  # the unrelated one went with the first
