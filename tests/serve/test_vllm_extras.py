"""vLLM's extra request fields and helper routes, honoured as vLLM users expect."""

import json

import httpx
import pytest
from openai import OpenAI

from nvfp4kit.engine.request import make_request
from nvfp4kit.sampling import SamplingParams

from .conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def api(server) -> OpenAI:
    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def complete(api, **fields):
    extra = {
        k: fields.pop(k) for k in list(fields) if k not in ("prompt", "max_tokens", "temperature", "stop")
    }
    return api.completions.create(model="tiny", extra_body=extra, **{"temperature": 0, **fields}).choices[0]


def test_tokenize_detokenize_and_info(server):
    tokens = httpx.post(
        server + "/tokenize", json={"model": "tiny", "prompt": "Hello"}, headers=HEADERS
    ).json()
    assert (
        tokens["tokens"][0] == 2
        and tokens["count"] == len(tokens["tokens"])
        and tokens["max_model_len"] == 512
    )
    text = httpx.post(
        server + "/detokenize", json={"model": "tiny", "tokens": tokens["tokens"]}, headers=HEADERS
    )
    assert text.json()["prompt"] == "<bos>Hello"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    rendered = httpx.post(server + "/tokenize", json=chat, headers=HEADERS).json()
    assert rendered["tokens"].count(105) == 2  # <|turn>user and <|turn>model
    info = httpx.get(server + "/tokenizer_info", headers=HEADERS).json()
    assert info["bos_token"] == "<bos>" and "<|turn>" in info["chat_template"]
    assert httpx.get(server + "/version").json()["version"]
    assert httpx.get(server + "/v1/models/tiny-alias", headers=HEADERS).json()["id"] == "tiny-alias"
    assert httpx.get(server + "/v1/models/nope", headers=HEADERS).status_code == 404
    assert httpx.post(server + "/detokenize", json={"tokens": [-1]}, headers=HEADERS).status_code == 400
    assert httpx.post(server + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_stop_token_ids_add_to_the_eos_ids():
    params = SamplingParams(stop_token_ids=(5,))
    request = make_request("r", [2, 3], params, tokenizer=None, eos_ids=(1, 106, 50))
    assert request.stop_ids == {1, 5, 50, 106}
    ignoring = make_request(
        "r", [2, 3], SamplingParams(stop_token_ids=(5,), ignore_eos=True), tokenizer=None, eos_ids=(1,)
    )
    assert ignoring.stop_ids == {5}


def test_include_stop_str_in_output(api):
    text = complete(api, prompt="Once", max_tokens=12, ignore_eos=True).text
    assert len(text) > 4
    stop = text[2:4]
    cut = complete(api, prompt="Once", max_tokens=12, ignore_eos=True, stop=[stop])
    kept = complete(
        api, prompt="Once", max_tokens=12, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + stop and text.startswith(kept.text)


def test_logit_bias_forces_a_token(api):
    choice = complete(api, prompt="Hi", max_tokens=5, logit_bias={"300": 100}, logprobs=0)
    assert len(set(choice.logprobs.tokens)) == 1


def test_min_tokens_runs_past_a_stop_id(api, server):
    plain = complete(api, prompt="Hi", max_tokens=8, logprobs=1)
    top_first = max(plain.logprobs.top_logprobs[0], key=plain.logprobs.top_logprobs[0].get)
    first_id = httpx.post(
        server + "/tokenize", json={"prompt": top_first, "add_special_tokens": False}, headers=HEADERS
    ).json()["tokens"][0]
    stopped = complete(api, prompt="Hi", max_tokens=8, stop_token_ids=[first_id])
    assert stopped.finish_reason == "stop" and stopped.text == ""
    held = complete(api, prompt="Hi", max_tokens=8, stop_token_ids=[first_id], min_tokens=3)
    assert held.text != ""


def test_skip_special_tokens_in_completions(api, server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    special = 106  # <turn|>, forced by a bias so the output holds a control token
    forced = {**body, "logit_bias": {str(special): 100}, "stop_token_ids": []}
    kept = httpx.post(server + "/v1/completions", json=forced, headers=HEADERS).json()["choices"][0]["text"]
    skipped = httpx.post(
        server + "/v1/completions", json={**forced, "skip_special_tokens": True}, headers=HEADERS
    ).json()["choices"][0]["text"]
    assert "<turn|>" in kept and "<turn|>" not in skipped


def test_continue_final_message(server):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, my name"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "temperature": 0}
    bad = httpx.post(
        server + "/v1/chat/completions", json={**body, "continue_final_message": True}, headers=HEADERS
    )
    assert bad.status_code == 400 and "add_generation_prompt" in bad.json()["error"]["message"]
    good = httpx.post(
        server + "/v1/chat/completions",
        json={**body, "continue_final_message": True, "add_generation_prompt": False},
        headers=HEADERS,
    )
    assert good.status_code == 200
    tokens = httpx.post(
        server + "/tokenize", json={"messages": messages, "add_generation_prompt": False}, headers=HEADERS
    ).json()["tokens"]
    assert tokens[-2] == 106  # the full render closes the turn; the continued prompt must not
    assert good.json()["usage"]["prompt_tokens"] == len(tokens) - 2


def test_skip_special_tokens_in_chat_content(scripted_server):
    base_url, _ = scripted_server(lambda prompt: "Hi <mask>there")
    body = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}]}
    kept = httpx.post(base_url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    body["skip_special_tokens"] = True
    skipped = httpx.post(base_url + "/v1/chat/completions", json=body).json()["choices"][0]["message"][
        "content"
    ]
    streamed = ""
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                streamed += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
    assert kept == "Hi <mask>there" and skipped == streamed == "Hi there"
