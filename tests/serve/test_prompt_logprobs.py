"""Prompt logprobs from the prefill pass: the numbers a teacher-forced forward gives, chunked or not, and
`echo` + `logprobs` on /v1/completions shaped as lm-eval's loglikelihood requests read them."""

import json
import math

import httpx
import pytest

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [2, 17, 101, 33, 250, 7, 64, 90, 12, 300, 41]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    return load_model(tiny_checkpoint), Tokenizer(tiny_checkpoint)


def run(engine, prompt, params):
    request_id = engine.add_request(prompt, params)
    events = []
    while engine.has_unfinished():
        events += [e for e in engine.step() if e.request_id == request_id]
    return events


def test_prompt_logprobs_equal_the_logprobs_of_generating_those_tokens(parts):
    model, tok = parts
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=64))
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    generated = run(engine, PROMPT, greedy)
    continuation = [e.token_id for e in generated]
    for chunk in (64, 5):  # one prefill chunk, and chunks of 5 tokens
        engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=chunk))
        asked = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
        entries = run(engine, PROMPT + continuation, asked)[0].prompt_logprobs
        assert len(entries) == len(PROMPT) + len(continuation) and entries[0] is None
        assert [e.token_id for e in entries[1:]] == (PROMPT + continuation)[1:]
        tail = entries[len(PROMPT) :]
        for entry, event in zip(tail, generated):
            assert entry.logprob == pytest.approx(event.logprob, abs=1e-4)
            assert entry.rank == 1 and entry.top[0][0] == entry.token_id and len(entry.top) == 2


def lm_eval_loglikelihood(server, context, continuation):
    """What lm-eval's local-completions does for one loglikelihood request (token-id prompts)."""
    body = {
        "model": "tiny",
        "prompt": [context + continuation],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    response = httpx.post(server + "/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]["token_logprobs"][len(context) : -1]
    tops = choice["logprobs"]["top_logprobs"][len(context) : -1]
    is_greedy = all(lp == max(top.values()) for lp, top in zip(logprobs, tops))
    return sum(logprobs), is_greedy, choice


def test_echo_logprobs_serve_a_multiple_choice_question(server):
    context = PROMPT
    greedy = httpx.post(
        server + "/v1/completions",
        json={
            "model": "tiny",
            "prompt": context,
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
        },
        headers=HEADERS,
        timeout=60,
    ).json()["choices"][0]
    greedy_ids = [
        int(t)
        for t in httpx.post(
            server + "/tokenize",
            json={"model": "tiny", "prompt": greedy["text"], "add_special_tokens": False},
            headers=HEADERS,
        ).json()["tokens"]
    ]
    options = [greedy_ids, [5] * len(greedy_ids), [300 + i for i in range(len(greedy_ids))]]
    scores = [lm_eval_loglikelihood(server, context, option) for option in options]
    total, is_greedy, choice = scores[0]
    assert total == pytest.approx(sum(greedy["logprobs"]["token_logprobs"][: len(greedy_ids)]), abs=1e-3)
    assert is_greedy and not scores[1][1]
    assert max(range(3), key=lambda i: scores[i][0]) == 0  # the model's own answer is the most likely
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(context) + len(greedy_ids) + 1
    assert all(math.isfinite(lp) for lp in logprobs["token_logprobs"][1:])


def test_vllm_prompt_logprobs_field(server):
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 1, "prompt_logprobs": 2}
    choice = httpx.post(server + "/v1/completions", json=body, headers=HEADERS, timeout=60).json()["choices"][
        0
    ]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) >= 2
    for entry in entries[1:]:
        assert 2 <= len(entry) <= 3 and all(
            {"logprob", "rank", "decoded_token"} <= set(v) for v in entry.values()
        )


def test_streamed_echo_carries_the_prompt_logprobs_first(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True}
    whole = httpx.post(server + "/v1/completions", json=body, headers=HEADERS, timeout=60).json()["choices"][
        0
    ]
    chunks = []
    with httpx.stream(
        "POST", server + "/v1/completions", json={**body, "stream": True}, headers=HEADERS
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += json.loads(line[6:])["choices"]
    streamed = [lp for c in chunks if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
    assert chunks[0]["logprobs"]["token_logprobs"][0] is None and len(chunks[0]["logprobs"]["tokens"]) == len(
        PROMPT
    )
    assert streamed[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_chat_prompt_logprobs(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "prompt_logprobs": 0,
    }
    reply = httpx.post(server + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60).json()
    entries = reply["prompt_logprobs"]
    assert entries[0] is None and len(entries) == reply["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in entries[1:])  # the prompt token itself, no alternatives
