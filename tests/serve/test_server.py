"""`nvfp4kit serve` on a tiny random checkpoint, driven by the official openai client."""

import asyncio
import json
import random
import socket
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from nvfp4kit.prompting.chat_template import load_chat_template
from nvfp4kit.tokenizer import Tokenizer

from .conftest import API_KEY

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def api(server) -> OpenAI:
    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_health_and_metrics(server, api):
    assert [m.id for m in api.models.list().data] == ["tiny", "tiny-alias"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "prompt_tokens_cached_total",
        "generation_tokens_total",
        "time_to_first_token_seconds",
        "request_preprocess_seconds",
        "request_engine_first_token_seconds",
        "inter_token_latency_seconds",
        "num_requests_running",
        "num_requests_waiting",
        "num_requests_background",
    ):
        assert f"# TYPE nvfp4kit_{name}" in text


def test_time_to_first_token_is_split_into_preprocessing_and_engine(server, api):
    """Each first token's TTFT is the server's preprocessing (arrival to the engine) plus the engine's part."""

    def read(name: str) -> float:
        return metric(server, f"nvfp4kit_{name}")

    before = {n: read(n) for n in ("time_to_first_token_seconds_count", "request_engine_first_token_seconds_count",
                                   "time_to_first_token_seconds_sum", "request_engine_first_token_seconds_sum",
                                   "request_preprocess_seconds_count")}  # fmt: skip
    api.chat.completions.create(model="tiny", messages=HI, max_tokens=2, **GREEDY)
    ttft = read("time_to_first_token_seconds_sum") - before["time_to_first_token_seconds_sum"]
    engine = read("request_engine_first_token_seconds_sum") - before["request_engine_first_token_seconds_sum"]
    assert read("time_to_first_token_seconds_count") - before["time_to_first_token_seconds_count"] == 1
    assert (
        read("request_engine_first_token_seconds_count") - before["request_engine_first_token_seconds_count"]
        == 1
    )
    assert read("request_preprocess_seconds_count") - before["request_preprocess_seconds_count"] == 1
    assert 0 < engine <= ttft


def test_api_key_is_required_on_v1_routes(server):
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(
            server + "/v1/chat/completions", json={"model": "tiny", "messages": HI}, headers=headers
        )
        assert response.status_code == 401
        assert "API key" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server + "/health").status_code == 200


def test_chat_streaming_equals_non_streaming(api):
    whole = api.chat.completions.create(model="tiny", messages=HI, max_tokens=24, **GREEDY)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(
        api.chat.completions.create(
            model="tiny-alias",
            messages=HI,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    assert text == (choice.message.content or "")
    assert reasoning == (getattr(choice.message, "reasoning_content", None) or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].choices == []
    counts = lambda usage: (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)  # noqa: E731
    # the same prompt a second time may be served partly from the prefix cache: only cached_tokens may differ
    assert counts(chunks[-1].usage) == counts(whole.usage)
    assert all(c.model == "tiny-alias" for c in chunks)


def test_max_completion_tokens_n_and_seed(api):
    result = api.chat.completions.create(
        model="tiny",
        messages=HI,
        max_completion_tokens=3,
        temperature=1.0,
        n=3,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.completion_tokens == 9 and all(c.finish_reason == "length" for c in result.choices)
    again = api.chat.completions.create(
        model="tiny",
        messages=HI,
        max_completion_tokens=3,
        temperature=1.0,
        n=3,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in result.choices]


def test_chat_logprobs(api):
    result = api.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    entries = result.choices[0].logprobs.content
    assert len(entries) == 8
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob <= 0
    streamed = api.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    streamed_entries = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed_entries] == [(e.token, e.logprob) for e in entries]


def test_thinking_switch_changes_the_prompt(server, api, tiny_checkpoint):
    template, tokenizer = load_chat_template(tiny_checkpoint), Tokenizer(tiny_checkpoint)
    for thinking in (True, False):
        result = api.chat.completions.create(
            model="tiny",
            messages=HI,
            max_tokens=2,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        )
        prompt = template.render(HI, template_kwargs={"enable_thinking": thinking})
        assert ("<|think|>" in prompt) == thinking
        assert result.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_named_tool_choice_with_the_real_model(api):
    tool = {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
    result = api.chat.completions.create(
        model="tiny",
        messages=HI,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        max_tokens=4,
        **GREEDY,
    )
    assert result.choices[0].message.tool_calls[0].function.name == "lookup"
    assert result.choices[0].finish_reason in ("tool_calls", "length")


def test_completions_text_tokens_echo_and_logprobs(api):
    result = api.completions.create(model="tiny", prompt=["Once upon", "A time"], n=2, max_tokens=5, **GREEDY)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text  # greedy: both samples agree
    ids = api.completions.create(model="tiny", prompt=[2, 200, 201], max_tokens=5, **GREEDY)
    assert ids.usage.prompt_tokens == 3
    streamed = api.completions.create(model="tiny", prompt="Once upon", max_tokens=5, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text
    echoed = api.completions.create(model="tiny", prompt="Once upon", max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Once upon" + result.choices[0].text
    with_logprobs = api.completions.create(
        model="tiny", prompt="Once upon", max_tokens=4, logprobs=2, extra_body={"ignore_eos": True}, **GREEDY
    )
    logprobs = with_logprobs.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_stop_string_cuts_the_text(api):
    """The stop string is taken from the greedy text itself (fixed for the fixed tiny checkpoint), so the
    check always runs: the cut text is everything before the stop string's first occurrence."""
    request = {
        "model": "tiny",
        "prompt": "abc",
        "max_tokens": 16,
        "extra_body": {"ignore_eos": True},
        **GREEDY,
    }
    text = api.completions.create(**request).choices[0].text
    # two visible characters whose first occurrence is not at the start (so the cut leaves some text)
    stop = next(
        (
            text[i : i + 2]
            for i in range(1, len(text) - 1)
            if text.index(text[i : i + 2]) > 0
            and text[i : i + 2].isprintable()
            and not text[i : i + 2].isspace()
        ),
        None,
    )
    assert stop is not None, f"greedy text {text!r} has no two-character stop string to cut at"
    cut = api.completions.create(**request, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_match_requests_alone(server, api):
    prompts = [f"Prompt number {i}" for i in range(8)]
    alone = {
        p: api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=12, **GREEDY
        )
        .choices[0]
        .message.content
        or ""
        for p in prompts
    }

    async def one(client: AsyncOpenAI, prompt: str) -> str:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=12, stream=True, **GREEDY
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def many() -> list[str]:
        async with AsyncOpenAI(
            base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, prompts[i % 8]) for i in range(32)))

    texts = asyncio.run(many())
    assert texts == [alone[prompts[i % 8]] for i in range(32)]
    # nothing left running, once the one-token prefills that warm each chat's next turn are done
    wait_until(lambda: metric(server, "nvfp4kit_num_requests_running") == 0, "requests left running")


def wait_until(condition: Callable[[], bool], failure: str, limit: float = 30.0) -> None:
    """Poll until `condition()` holds; `limit` only bounds a hung server, nothing races it."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)


def assert_engine_dropped_it(server: str, api: OpenAI, tokens_before: float) -> None:
    """After an abort: the request's tokens stopped short of its 400, and a later request finds no request
    running. The engine takes commands in order, so the abort reached it before that request started; a
    request still generating its 400 tokens would be counted as running."""
    assert metric(server, "nvfp4kit_generation_tokens_total") - tokens_before < 400
    api.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert metric(server, "nvfp4kit_num_requests_running") == 0


def test_client_disconnect_aborts_the_stream(server, api):
    aborted = 'nvfp4kit_requests_total{endpoint="completions",outcome="aborted"}'
    before, aborted_before = metric(server, "nvfp4kit_generation_tokens_total"), metric(server, aborted)
    body = {"model": "tiny", "prompt": "Go on", "max_tokens": 400, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(4)]
    wait_until(lambda: metric(server, aborted) > aborted_before, "the server did not notice the disconnect")
    assert_engine_dropped_it(server, api, before)


def test_client_disconnect_aborts_a_non_streamed_request(server, api):
    """The client goes away once the request is generating (seen in /metrics), not after a fixed time."""
    aborted = 'nvfp4kit_requests_total{endpoint="chat",outcome="aborted"}'
    before, aborted_before = metric(server, "nvfp4kit_generation_tokens_total"), metric(server, aborted)
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 400, "ignore_eos": True}).encode()
    url = httpx.URL(server)
    with socket.create_connection((url.host, url.port)) as client:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        client.sendall(head.encode() + body)
        wait_until(
            lambda: metric(server, "nvfp4kit_generation_tokens_total") > before, "the request never started"
        )
    wait_until(lambda: metric(server, aborted) > aborted_before, "the server did not notice the disconnect")
    assert_engine_dropped_it(server, api, before)


def test_usage_reports_prompt_tokens_served_by_the_prefix_cache(api):
    prompt = [2] + random.Random(2024).choices(range(10, 300), k=120)  # unseen by the other tests
    first = api.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == len(prompt)
    assert not (first.usage.prompt_tokens_details and first.usage.prompt_tokens_details.cached_tokens)
    again = api.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < len(prompt)
    stream = api.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage][-1]
    assert usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].text == first.choices[0].text  # the cache changes no token
