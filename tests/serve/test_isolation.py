"""One request's failure ends that request only: a poisoned request inside a batch of healthy streams, the
NaN/inf safety of sampling, the logits processors, and incremental stop-string matching."""

import asyncio
import random
import time

import pytest
import torch

from nvfp4kit.engine import batch_sampler as sampler_module
from nvfp4kit.engine.async_batching import AsyncBatchingEngine, RequestFailed
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.logits_processors import LogitsRow, process_logits
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams, StopStringMatcher, sample_token
from nvfp4kit.tokenizer import Tokenizer

POISON_SEED = 13
HEALTHY = [SamplingParams(max_tokens=12, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2, 3)]
PROMPTS = [[2, 10, 20, 30], [2, 40, 50], [2, 60, 70, 80, 90]]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    return load_model(tiny_checkpoint), Tokenizer(tiny_checkpoint)


async def _collect(engine, prompt, params):
    return [e.token_id async for e in engine.stream(prompt, params)]


def test_a_poisoned_request_fails_alone_and_the_batch_is_unchanged(parts, monkeypatch):
    model, tok = parts
    real_sample = sampler_module.sample_table

    def sample_or_break(logits, rows):
        if any(row.params.seed == POISON_SEED for row in rows):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, rows)

    monkeypatch.setattr(sampler_module, "sample_table", sample_or_break)
    poison = SamplingParams(max_tokens=12, temperature=0.8, seed=POISON_SEED, ignore_eos=True)

    async def run(with_poison: bool):
        engine = AsyncBatchingEngine(Engine(model, tok, config=EngineConfig(max_num_batched_tokens=64)))
        jobs = [_collect(engine, p, params) for p, params in zip(PROMPTS, HEALTHY)]
        if with_poison:
            jobs.append(_collect(engine, [2, 11, 12], poison))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for _ in range(200):  # the worker refreshes its gauges just after the last events
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.close()
        return results, stats

    alone, _ = asyncio.run(run(False))
    mixed, stats = asyncio.run(run(True))
    assert mixed[:3] == alone[:3] and all(len(tokens) == 12 for tokens in alone)
    assert isinstance(mixed[3], RequestFailed) and "probability tensor" in str(mixed[3])
    assert stats.running == 0 and stats.waiting == 0


def test_extreme_parameters_sample_without_nan():
    logits = torch.randn(64) * 5
    for params in (
        SamplingParams(temperature=1e-45),
        SamplingParams(temperature=1.0, repetition_penalty=1e-300),
        SamplingParams(temperature=2.0, logit_bias=((3, 1e30),)),
    ):
        result = sample_token(logits.clone(), params, prompt_ids=list(range(64)), output_ids=[1, 2])
        assert 0 <= result.token_id < 64
    assert SamplingParams(temperature=1e-45).temperature == 0.0
    nan_row = torch.full((64,), float("nan"))
    assert (
        0
        <= sample_token(nan_row, SamplingParams(temperature=1.0), prompt_ids=[], output_ids=[]).token_id
        < 64
    )


def test_logit_bias_and_min_tokens_processors():
    logits = torch.zeros(2, 8)
    rows = [
        LogitsRow(SamplingParams(logit_bias=((5, 100.0), (6, -100.0))), 0, frozenset({1})),
        LogitsRow(SamplingParams(max_tokens=8, min_tokens=3), 2, frozenset({1, 7})),
    ]
    out = process_logits(logits, rows)
    assert out[0].argmax() == 5 and out[0, 6] == -100
    assert out[1, 1] == float("-inf") and out[1, 7] == float("-inf") and out[1, 0] == 0
    done = [LogitsRow(SamplingParams(max_tokens=8, min_tokens=3), 3, frozenset({1}))]
    assert process_logits(logits[:1], done) is not None and torch.equal(
        process_logits(logits[:1], done), logits[:1]
    )


def _first_stop_brute(text, stops):
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits)[0] if hits else None


def test_stop_matcher_equals_a_full_rescan_for_any_split():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 40)))
        stops = tuple("".join(rng.choice("ab c") for _ in range(rng.randint(1, 5))) for _ in range(3))
        matcher = StopStringMatcher(stops)
        found, end = None, 0
        while found is None and end < len(text):
            end = min(len(text), end + rng.randint(1, 4))
            found = matcher.feed(text[:end])
        expected = _first_stop_brute(text[:end], stops)
        assert found == expected, (text, stops, end)
        if found is None:
            tail = max((n for s in stops for n in range(len(s)) if n and text.endswith(s[:n])), default=0)
            assert matcher.partial == tail


def test_long_stop_strings_cost_only_the_new_text():
    stops = tuple("x" * 2047 + str(i) for i in range(32))  # the server's limits: 32 strings of 2048
    matcher = StopStringMatcher(stops)
    text = ""
    start = time.perf_counter()
    for _ in range(2000):  # 2000 tokens of 4 characters
        text += "xxxx"
        assert matcher.feed(text) is None
    assert time.perf_counter() - start < 2.0  # a full rescan per token takes minutes
