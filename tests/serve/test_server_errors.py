"""Every kind of bad request gets a 4xx in OpenAI's error shape with a message that says what to fix,
and the server answers the next good request normally."""

import httpx
import pytest

from .conftest import API_KEY, MAX_MODEL_LEN

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "Hi"}]
PNG_URL = "data:image/png;base64,iVBORw0KGgo="  # a PNG signature: well-formed, never decoded here
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


def chat(**fields):
    return {"model": "tiny", "messages": HI, "max_tokens": 2, **fields}


CHAT_CASES = [
    # (request body, status, words the message must contain)
    ('{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    (chat(temperature="hot"), 400, "temperature"),
    (chat(n=0), 400, "n: Input should be greater than or equal to 1"),
    (chat(messages="hi"), 400, "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    (chat(frobnicate=1), 400, "frobnicate"),
    (chat(model=7), 400, "model: Input should be a valid string"),
    (chat(model="gpt-9"), 404, "model 'gpt-9' does not exist; this server serves 'tiny', 'tiny-alias'"),
    (chat(messages=[]), 400, "messages is empty"),
    (
        chat(messages=[{"role": "user", "content": "x" * (2 * MAX_MODEL_LEN)}]),
        400,
        "shorten the prompt (messages)",
    ),
    (chat(max_tokens=10 * MAX_MODEL_LEN), 400, "lower max_tokens"),
    (chat(tools=[{"type": "function", "function": {"name": "has space"}}]), 400, "tools[0].function.name"),
    (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
        400,
        "parameters must have type 'object'",
    ),
    (
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
        400,
        "'other', which is not in tools (lookup)",
    ),
    (chat(tool_choice="required"), 400, "tool_choice needs tools"),
    (
        chat(messages=[*HI, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]),
        400,
        "matches no earlier assistant tool call",
    ),
    (
        chat(
            messages=[
                *HI,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{oops"}}
                    ],
                },
            ]
        ),
        400,
        "arguments is not valid JSON",
    ),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}]),
        400,
        "no vision tower",  # the text-only tiny checkpoint
    ),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "must be a data: URL",
    ),
    (chat(response_format={"type": "json_schema"}), 400, "json_schema must be {name, schema}"),
    (chat(response_format={"type": "yaml"}), 400, "use text, json_object or json_schema"),
    (chat(top_logprobs=3), 400, "top_logprobs needs logprobs: true"),
    (chat(stop=[""]), 400, "stop strings must not be empty"),
]


def good_request(server):
    response = httpx.post(server + "/v1/chat/completions", json=chat(), headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(("body", "status", "words"), CHAT_CASES)
def test_bad_chat_request(server, body, status, words):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(server + "/v1/chat/completions", headers=HEADERS, timeout=60, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    good_request(server)


def completion(**fields):
    return {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **fields}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (completion(prompt=["a", [1, 2]]), "prompt must be a string, a list of strings"),
        (completion(prompt=""), "prompt 0 is empty"),
        (completion(prompt=[2, 10**9]), "outside the vocabulary"),
        (completion(suffix="end"), "suffix"),
        (completion(prompt_logprobs=1, stream=True), "prompt_logprobs cannot be streamed"),
        (completion(best_of=3), "best_of must equal n"),
        (completion(logprobs=50), "logprobs"),
    ],
)
def test_bad_completion_request(server, body, words):
    response = httpx.post(server + "/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 400
    assert words in response.json()["error"]["message"]
    good_request(server)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 2}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
    ],
)
def test_a_request_without_a_model_is_served_by_the_first_name(server, route, body):
    """vLLM, SGLang and llama.cpp answer a body with no `model` (curl one-liners, some clients omit it)."""
    response = httpx.post(server + route, json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny"


def test_unknown_route_and_method_use_the_error_shape(server):
    response = httpx.get(server + "/v1/nothing", headers=HEADERS)
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(server + "/v1/chat/completions", headers=HEADERS)
    assert response.status_code == 405 and "error" in response.json()
    good_request(server)


def test_rejected_requests_are_counted(server):
    httpx.post(server + "/v1/chat/completions", json=chat(n=0), headers=HEADERS)
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'nvfp4kit_requests_total{endpoint="chat",outcome="rejected"}' in text
