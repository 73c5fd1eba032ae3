"""vLLM request fields through the HTTP server on the tiny model: allowed_token_ids, bad_words,
truncate_prompt_tokens, add_special_tokens, return_tokens_as_token_ids, return_token_ids, cache_salt,
request_id and priority (each refused with a 400 naming it when malformed)."""

import json
import random

import httpx
import pytest

from .conftest import API_KEY, MAX_MODEL_LEN

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def post(server: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(server + route, json={"model": "tiny", **body}, headers=HEADERS, timeout=60)


def completion(server: str, **body) -> dict:
    response = post(server, "/v1/completions", {"temperature": 0, "max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat(server: str, **body) -> dict:
    messages = [{"role": "user", "content": "Hi"}]
    response = post(server, "/v1/chat/completions", {"messages": messages, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def streamed_chunks(server: str, route: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream(
        "POST", server + route, json={"model": "tiny", "stream": True, **body}, headers=HEADERS, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


def token_id(server: str, text: str) -> int:
    [only] = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    return only


def test_allowed_token_ids_limit_sampling_batched_and_streamed(server):
    allowed = [300, 301, 302]
    body = {"prompt": "Once", "max_tokens": 10, "ignore_eos": True, "return_token_ids": True}
    free = completion(server, **body, temperature=1.0, seed=5)["choices"][0]["token_ids"]
    assert not set(free) <= set(allowed)  # the model would say other things
    # n = 3 sampled rows and a greedy request run through the batched sampler together
    sampled = completion(server, **body, temperature=1.0, seed=5, n=3, allowed_token_ids=allowed)
    for choice in sampled["choices"]:
        assert len(choice["token_ids"]) == 10 and set(choice["token_ids"]) <= set(allowed)
    greedy = completion(server, **body, allowed_token_ids=allowed)["choices"][0]["token_ids"]
    assert set(greedy) <= set(allowed)
    chunks = streamed_chunks(
        server, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": True,
         "allowed_token_ids": allowed, "return_token_ids": True, "temperature": 1.0},
    )  # fmt: skip
    streamed = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids", [])]
    assert len(streamed) == 6 and set(streamed) <= set(allowed)


def test_bad_words_ban_single_tokens_and_the_last_token_of_sequences(server):
    a, b, c = token_id(server, "a"), token_id(server, "b"), token_id(server, "c")
    # a bias makes the greedy reply "aaaa...", with "b" next best and "c" after it
    body = {
        "prompt": "Once",
        "max_tokens": 6,
        "ignore_eos": True,
        "return_token_ids": True,
        "logit_bias": {str(a): 60, str(b): 50, str(c): 40},
    }
    assert completion(server, **body)["choices"][0]["token_ids"] == [a] * 6
    # a one-token word is banned outright
    assert completion(server, **body, bad_words=["a"])["choices"][0]["token_ids"] == [b] * 6
    # "aa": the second "a" is banned only right after an "a"
    assert completion(server, **body, bad_words=["aa"])["choices"][0]["token_ids"] == [a, b] * 3
    # "ab" and "aa" together: after an "a" both are banned (so "c"), after a "c" the "a" is free again
    both = completion(server, **body, bad_words=["ab", "aa"])["choices"][0]["token_ids"]
    assert both == [a, c] * 3
    # the same in a stream, and sampled (the bias leaves a, b and c only: top_k 3)
    chunks = streamed_chunks(
        server, "/v1/completions",
        {**body, "bad_words": ["aa"], "temperature": 0.01, "top_k": 3, "seed": 1},
    )  # fmt: skip
    streamed = [t for chunk in chunks for choice in chunk["choices"] for t in choice.get("token_ids", [])]
    assert streamed == [a, b] * 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(server):
    ids = [2] + random.Random(7).choices(range(10, 300), k=40)
    body = {"max_tokens": 4, "ignore_eos": True, "return_token_ids": True}
    cut = completion(server, prompt=ids, truncate_prompt_tokens=9, **body)
    direct = completion(server, prompt=ids[-9:], **body)
    assert cut["usage"]["prompt_tokens"] == 9 and cut["choices"][0]["prompt_token_ids"] == ids[-9:]
    assert cut["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
    assert completion(server, prompt=ids, truncate_prompt_tokens=100, **body)["usage"]["prompt_tokens"] == 41
    reply = chat(server, max_tokens=2, truncate_prompt_tokens=5, return_token_ids=True)
    assert reply["usage"]["prompt_tokens"] == 5 and len(reply["prompt_token_ids"]) == 5
    for bad in (0, -1, MAX_MODEL_LEN + 1):
        response = post(server, "/v1/completions", {"prompt": "Hi", "truncate_prompt_tokens": bad})
        assert response.status_code == 400, bad
        assert "truncate_prompt_tokens" in response.json()["error"]["param"]


def test_add_special_tokens(server):
    body = {"prompt": "Hello", "max_tokens": 1, "return_token_ids": True}
    with_bos = completion(server, **body)["choices"][0]["prompt_token_ids"]
    without = completion(server, **body, add_special_tokens=False)["choices"][0]["prompt_token_ids"]
    assert with_bos[0] == 2 and with_bos[1:] == without and without[0] != 2
    plain = chat(server, max_tokens=1, return_token_ids=True)["prompt_token_ids"]
    doubled = chat(server, max_tokens=1, return_token_ids=True, add_special_tokens=True)["prompt_token_ids"]
    assert plain[0] == 2 and plain[1] != 2 and doubled == [2, *plain]  # on top of the template's, as vLLM
    thinking = chat(
        server, max_tokens=1, return_token_ids=True, chat_template_kwargs={"enable_thinking": True}
    )
    assert thinking["prompt_token_ids"] != plain  # the template switch reaches the prompt


def test_return_tokens_as_token_ids_and_token_ids(server):
    done = completion(
        server, prompt="Once", max_tokens=5, ignore_eos=True, logprobs=2, echo=True,
        return_tokens_as_token_ids=True, return_token_ids=True,
    )["choices"][0]  # fmt: skip
    names = done["logprobs"]["tokens"]
    assert names == [f"token_id:{t}" for t in done["prompt_token_ids"] + done["token_ids"]]
    assert all(key.startswith("token_id:") for top in done["logprobs"]["top_logprobs"][1:] for key in top)
    reply = chat(
        server, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=1,
        return_tokens_as_token_ids=True, return_token_ids=True,
    )  # fmt: skip
    content = reply["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in reply["choices"][0]["token_ids"]]
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert (
        reply["prompt_token_ids"][0] == 2
        and len(reply["prompt_token_ids"]) == reply["usage"]["prompt_tokens"]
    )
    chunks = streamed_chunks(
        server, "/v1/completions",
        {"prompt": "Once", "max_tokens": 5, "ignore_eos": True, "temperature": 0, "return_token_ids": True},
    )  # fmt: skip
    assert chunks[0]["choices"][0]["prompt_token_ids"][0] == 2
    streamed = [t for chunk in chunks for choice in chunk["choices"] for t in choice.get("token_ids", [])]
    assert (
        streamed
        == completion(server, prompt="Once", max_tokens=5, ignore_eos=True, return_token_ids=True)["choices"][
            0
        ]["token_ids"]
    )


def test_cache_salt_separates_prefix_cache_entries(server):
    prompt = [2] + random.Random(4242).choices(range(10, 300), k=120)  # unseen by the other tests

    def cached(**fields) -> int:
        usage = completion(server, prompt=prompt, max_tokens=1, **fields)["usage"]
        return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    assert cached(cache_salt="alice") == 0
    assert cached(cache_salt="alice") > 0  # same salt: shared
    assert cached(cache_salt="bob") == 0  # another salt: never the other's blocks
    assert cached() == 0  # no salt: not the salted blocks either
    assert cached() > 0
    response = post(server, "/v1/completions", {"prompt": "Hi", "cache_salt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


def test_request_id_and_priority(server):
    assert completion(server, prompt="Hi", max_tokens=1, request_id="job-17")["id"] == "cmpl-job-17"
    assert chat(server, max_tokens=1, request_id="job-18")["id"] == "chatcmpl-job-18"
    chunks = streamed_chunks(
        server, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "request_id": "job-19"},
    )  # fmt: skip
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-job-19"}
    assert completion(server, prompt="Hi", max_tokens=1, priority=0)["choices"]
    refused = post(server, "/v1/completions", {"prompt": "Hi", "priority": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert "priority scheduling is not enabled" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("allowed_token_ids", []),
        ("allowed_token_ids", [-1]),
        ("allowed_token_ids", [10**6]),
        ("allowed_token_ids", "1,2"),
        ("bad_words", [""]),
        ("bad_words", "word"),
        ("return_token_ids", "maybe"),
        ("return_tokens_as_token_ids", [1]),
        ("add_special_tokens", "nope"),
        ("truncate_prompt_tokens", 2.5),
        ("request_id", ""),
        ("cache_salt", 5),
        ("priority", "high"),
    ],
)
def test_malformed_fields_get_a_400_naming_them(server, field, value):
    for route, body in (
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        response = post(server, route, {**body, "max_tokens": 1, field: value})
        assert response.status_code == 400, (route, field, value, response.text)
        assert response.json()["error"]["param"].split(".")[0] == field
