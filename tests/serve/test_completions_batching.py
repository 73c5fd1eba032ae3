"""The server path batches: a list of prompts on /v1/completions runs concurrently in the engine (choice
p * n + j is prompt p's sample j), one prompt's failure fails only its request, and the engine's worker
thread hands out token ids while text and stop strings are made on the event loop."""

import asyncio
import contextlib
import json
import threading

import pytest

from nvfp4kit.engine.async_batching import AsyncBatchingEngine, RequestFailed
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.completions import CompletionHandler
from nvfp4kit.serve.metrics import ServerMetrics
from nvfp4kit.serve.protocol import CompletionRequest
from nvfp4kit.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    return load_model(tiny_checkpoint), Tokenizer(tiny_checkpoint)


class RecordingEngine:
    """An AsyncBatchingEngine that records how many of its streams were open at once, and can make the
    stream of one prompt fail."""

    def __init__(self, inner: AsyncBatchingEngine, fail_prompt: list[int] | None = None) -> None:
        self.inner, self.fail_prompt = inner, fail_prompt
        self.tokenizer, self.max_model_len = inner.tokenizer, inner.max_model_len
        self.stop_token_ids = inner.stop_token_ids
        self.open = self.most_open = self.closed = 0

    def stats(self):
        return self.inner.stats()

    async def stream(self, prompt_ids, params):
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async for event in self.inner.stream(prompt_ids, params):
                if prompt_ids == self.fail_prompt and event.token_id >= 0:
                    raise RequestFailed("sampling failed: poisoned")
                yield event
        finally:
            self.open -= 1
            self.closed += 1


def run(parts, body: dict, *, stream: bool = False, fail_prompt=None, also: list[dict] = ()):
    """The completions handler over a real engine; returns (response or SSE chunks, the recorder, results of
    the `also` requests sent at the same time)."""
    model, tok = parts

    async def main():
        inner = AsyncBatchingEngine(Engine(model, tok, config=EngineConfig(max_num_batched_tokens=64)))
        engine = RecordingEngine(inner, fail_prompt)
        handler = CompletionHandler(engine, ServerMetrics(engine.stats))

        async def one(request_body: dict, streamed: bool):
            job = handler.prepare(CompletionRequest.model_validate(request_body), model="tiny")
            if not streamed:
                return await handler.complete(job)
            return [chunk async for chunk in handler.stream(job)]

        try:
            results = await asyncio.gather(
                one(body, stream), *(one(b, False) for b in also), return_exceptions=True
            )
        finally:
            await inner.close()
        return results[0], engine, results[1:]

    return asyncio.run(main())


def greedy(prompt, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}


def test_a_prompt_list_runs_concurrently_and_equals_single_requests(parts):
    singles = [run(parts, greedy(p))[0] for p in PROMPTS]
    response, engine, _ = run(parts, greedy(PROMPTS, n=2))
    assert engine.most_open == len(PROMPTS) * 2  # every prompt's choices were in the engine together
    choices = response["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    for p, single in enumerate(singles):
        for j in range(2):  # prompt p, copy j -> index p * n + j
            assert choices[p * 2 + j]["text"] == single["choices"][0]["text"]
    usage = response["usage"]
    assert usage["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert usage["completion_tokens"] == 2 * sum(s["usage"]["completion_tokens"] for s in singles)


def test_a_streamed_prompt_list_merges_by_index(parts):
    singles = [run(parts, greedy(p))[0]["choices"][0]["text"] for p in PROMPTS]
    chunks, engine, _ = run(
        parts, greedy(PROMPTS, stream=True, stream_options={"include_usage": True}), stream=True
    )
    assert engine.most_open == len(PROMPTS)
    texts, finished = [""] * len(PROMPTS), set()
    events = [json.loads(c[len("data: ") :]) for c in chunks if c != "data: [DONE]\n\n"]
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finished.add(choice["index"])
    assert texts == singles
    assert finished == {0, 1, 2}
    assert events[-1]["usage"]["completion_tokens"] == 8 * len(PROMPTS)


def test_one_failing_prompt_fails_its_request_only(parts, tiny_checkpoint):
    poisoned = Tokenizer(tiny_checkpoint).encode(PROMPTS[1])
    bystander = greedy("A request from someone else")
    alone = run(parts, bystander)[0]
    result, engine, others = run(parts, greedy(PROMPTS), fail_prompt=poisoned, also=[bystander])
    assert isinstance(result, RequestFailed)
    assert engine.open == 0 and engine.closed == len(PROMPTS) + 1  # the siblings were closed (aborted) too
    assert others[0]["choices"][0]["text"] == alone["choices"][0]["text"]


def test_the_engine_thread_never_detokenizes_and_stop_strings_still_cut(parts, monkeypatch):
    model, tok = parts
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = Engine(model, tok)  # the synchronous path detokenizes in the engine, as LLM does
    full.add_request(tok.encode(PROMPTS[0]), params, request_id="r")
    text = ""
    while full.has_unfinished():
        text += "".join(e.text for e in full.step())
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    decoders: set[str] = set()
    real_decode = tok.decode

    def recording_decode(*args, **kwargs):
        decoders.add(threading.current_thread().name)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tok, "decode", recording_decode)

    async def main():
        engine = AsyncBatchingEngine(Engine(model, tok))
        stopped = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,))
        events = []
        async with contextlib.aclosing(engine.stream(tok.encode(PROMPTS[0]), stopped)) as tokens:
            async for event in tokens:
                events.append(event)
        for _ in range(200):  # the abort of the engine's copy reaches the worker between steps
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        unfinished = engine.engine.has_unfinished()
        await engine.close()
        return events, unfinished

    events, unfinished = asyncio.run(main())
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert not unfinished  # the stop string found on the event loop ended the request in the engine
    assert decoders and "nvfp4kit-engine" not in decoders


def test_prefill_tokens_count_one_prefill_for_n_copies(parts):
    model, tok = parts
    prompt = tok.encode(" ".join(PROMPTS * 8))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    async def prefilled(prefix_caching: bool) -> int:
        config = EngineConfig(max_num_batched_tokens=256, prefix_caching=prefix_caching)
        engine = AsyncBatchingEngine(Engine(model, tok, config=config))

        async def one() -> None:
            async for _ in engine.stream(prompt, params):
                pass

        await asyncio.gather(*(one() for _ in range(4)))
        await engine.close()
        return engine.stats().prefill_tokens

    assert asyncio.run(prefilled(False)) == 4 * len(prompt)
    shared = asyncio.run(prefilled(True))  # the copies share the first one's full blocks
    assert len(prompt) <= shared < len(prompt) + 4 * 16, (shared, len(prompt))
