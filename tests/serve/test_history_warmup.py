"""A chat's next turn finds its last reply's KV cached (serve/history_warmup.py): once a reply is out and the
engine is idle, the server prefills the history as the next request will render it (Gemma 4's template drops
the generation prompt's thought channel from a finished turn, so the reply's own KV never matches)."""

import time

import httpx
import pytest
from openai import OpenAI

from .conftest import API_KEY


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def cached_tokens(usage) -> int:
    details = usage.prompt_tokens_details
    return (details.cached_tokens if details else 0) or 0


def wait_for_idle_after(base_url: str, prefilled_before: float, limit: float = 30.0) -> None:
    """Until the warm-up request has prefilled and finished (the engine's prefill counter moved, none running)."""
    deadline = time.monotonic() + limit
    while not (
        metric(base_url, "nvfp4kit_prefill_tokens_total") > prefilled_before
        and metric(base_url, "nvfp4kit_num_requests_running") == 0
    ):
        assert time.monotonic() < deadline, "the history was never warmed"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_the_next_turn_finds_the_reply_cached(server, stream):
    api = OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": f"Tell me a long story about warm caches, take {int(stream)}."}]
    prefilled = metric(server, "nvfp4kit_prefill_tokens_total")
    args = dict(model="tiny", messages=messages, max_tokens=40, temperature=0)
    if stream:
        chunks = list(
            api.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        )
        reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        first = api.chat.completions.create(**args)
        reply, usage = first.choices[0].message.content, first.usage
    first_prompt, first_cached = usage.prompt_tokens, cached_tokens(usage)
    wait_for_idle_after(server, prefilled + first_prompt - first_cached)  # past the first turn's own prefill
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    second = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    # the history up to the reply's end is cached (full blocks), far past where the first prompt parts from it
    cached = cached_tokens(second.usage)
    assert cached >= first_prompt + 16
