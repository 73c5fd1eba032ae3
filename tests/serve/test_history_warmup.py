"""A chat's next turn finds its last reply's KV cached (serve/history_warmup.py): once a reply is out and the
engine is idle, the server prefills the history as the next request will render it (Gemma 4's template drops
the generation prompt's thought channel from a finished turn, so the reply's own KV never matches)."""

import time

import httpx
import pytest
from openai import OpenAI

from nvfp4kit.serve.history_warmup import START_DELAY
from nvfp4kit.tokenizer import Tokenizer

from .conftest import API_KEY


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def cached_tokens(usage) -> int:
    details = usage.prompt_tokens_details
    return (details.cached_tokens if details else 0) or 0


def settle(base_url: str, limit: float = 30.0) -> None:
    """Until the warm-ups of the replies so far (on this session's server: other tests' too) have started, each
    `START_DELAY` after its reply, and finished."""
    time.sleep(START_DELAY + 0.5)
    deadline = time.monotonic() + limit
    while metric(base_url, "nvfp4kit_num_requests_background") or metric(
        base_url, "nvfp4kit_num_requests_running"
    ):
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.02)


def wait_for_prefill_past(base_url: str, prefilled: float, limit: float = 30.0) -> None:
    """Until the engine has prefilled more than `prefilled` tokens in all and runs nothing (warm-ups included)."""
    deadline = time.monotonic() + limit
    while not (
        metric(base_url, "nvfp4kit_prefill_tokens_total") > prefilled
        and metric(base_url, "nvfp4kit_num_requests_running") == 0
        and metric(base_url, "nvfp4kit_num_requests_background") == 0
    ):
        assert time.monotonic() < deadline, "the history was never warmed"
        time.sleep(0.02)


def chat(api: OpenAI, messages: list[dict], stream: bool, max_tokens: int, letters: list[int]):
    """(reply, prompt tokens, cached prompt tokens) of one chat completion written in `letters` (the random model
    would write reasoning or tool-call markup too, and a reply with a tool call is not warmed)."""
    args = dict(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
    args["extra_body"] = {"allowed_token_ids": letters}
    if stream:
        chunks = list(
            api.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        )
        reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        response = api.chat.completions.create(**args)
        reply, usage = response.choices[0].message.content, response.usage
    return reply, usage.prompt_tokens, cached_tokens(usage)


@pytest.mark.parametrize("stream", [False, True])
def test_the_next_turn_finds_the_reply_cached(server, tiny_checkpoint, stream):
    """From a conversation's second turn on (the first may be a one-shot request: no warm-up for it)."""
    api = OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    letters = Tokenizer(tiny_checkpoint).encode("abcdefghijklmnopqrstuvwxyz ", add_bos=False)
    messages = [{"role": "user", "content": f"Tell me a long story about warm caches, take {int(stream)}."}]
    reply, _, _ = chat(api, messages, stream, 8, letters)
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on, at length."}]
    settle(server)  # no earlier reply's warm-up counted in the prefill below
    prefilled = metric(server, "nvfp4kit_prefill_tokens_total")
    reply, prompt_tokens, cached = chat(api, messages, stream, 40, letters)
    wait_for_prefill_past(server, prefilled + prompt_tokens - cached)  # past the turn's own prefill
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    _, _, cached = chat(api, messages, False, 2, letters)
    # the history up to the reply's end is cached (full blocks), far past where the turn's prompt parts from it
    assert cached >= prompt_tokens + 16


def test_the_warm_up_is_a_background_request_after_a_pause(scripted_server):
    """The warm-up yields to the clients' requests in the engine (engine/scheduler.py): the history goes to the
    engine as a background request, and only after `START_DELAY`, so that a client's request sent right after
    the reply (here a new conversation) gets to the engine first."""
    base_url, engine = scripted_server(lambda prompt: "Sure, here it is.", warm_history=True)
    api = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me more."},
    ]
    reply = api.chat.completions.create(model="scripted", messages=messages, max_tokens=20)
    api.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "New"}], max_tokens=5)
    deadline = time.monotonic() + 30
    while len(engine.background) < 3:
        assert time.monotonic() < deadline, "the history was never warmed"
        time.sleep(0.02)
    assert engine.background == [False, False, True]
    assert engine.prompts[2].startswith(engine.prompts[0].split("Tell me more.")[0] + "Tell me more.")
    assert reply.choices[0].message.content in engine.prompts[2].split("Tell me more.")[1]
