"""Structured output through the openai client on the built-in demo model: 20 JSON schemas, JSON mode,
regex, choice, and grammar errors as 400s. llguidance is a test extra (`.[structured]`)."""

import asyncio
import json
import re
import threading

import httpx
import llguidance  # noqa: F401  (a test extra: CI fails, not skips, without it)
import pytest
from openai import AsyncOpenAI

from .conftest import free_port, wait_healthy  # noqa: E402

STR = {"type": "string", "maxLength": 16}
INT = {"type": "integer", "minimum": -999, "maximum": 999}  # bounded: a small model may repeat digits forever
SCHEMAS = [
    {"type": "object", "properties": {"name": STR}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"x": INT, "y": {"type": "number", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": STR, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"id": INT, "label": STR}, "required": ["id", "label"]},
    {"type": "array", "items": INT, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]},
    {"type": "object", "properties": {"nested": {"type": "object", "properties": {"a": INT}, "required": ["a"]}}, "required": ["nested"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "v": INT}, "required": ["kind", "v"]},
    {"type": "object", "properties": {"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 99}}, "required": ["n"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"q": INT}, "required": ["q"]}, "maxItems": 2}}, "required": ["items"]},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"a": STR, "b": STR, "c": STR}, "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"]},
    {"type": "object", "properties": {"flag": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["flag", "count"]},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"title": STR, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}, "required": ["title", "year"], "additionalProperties": False},
]  # fmt: skip


def strict(schema):
    """OpenAI's strict mode: objects list all their keys (else a small model may write keys forever)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    return schema


def valid(value, schema) -> bool:
    """Just enough of JSON Schema for SCHEMAS."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        checks = {
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
        }
        if not any(checks[k](value) for k in kinds):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            return False
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", 10**9) or not re.search(schema.get("pattern", ""), value):
            return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9):
            return False
        return all(valid(item, schema.get("items", {})) for item in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return False
        return all(valid(v, properties.get(k, {})) for k, v in value.items())
    return True


@pytest.fixture(scope="module")
def demo_server():
    import uvicorn

    from nvfp4kit.demo import demo_model_path
    from nvfp4kit.llm import LLM
    from nvfp4kit.prompting.chat_template import load_chat_template
    from nvfp4kit.serve.app import create_app
    from nvfp4kit.serve.engine_protocol import engine_for

    folder = demo_model_path("nvfp4")
    app = create_app(
        engine_for(LLM(folder, max_model_len=1024)), template=load_chat_template(folder), model_names=["demo"]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    wait_healthy(base_url)
    yield base_url
    server.should_exit = True
    thread.join(timeout=10)


def test_twenty_json_schemas_give_valid_json(demo_server):
    async def ask_all():
        client = AsyncOpenAI(base_url=demo_server + "/v1", api_key="none", max_retries=0, timeout=300)
        jobs = [
            client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": f"Answer in JSON: example {i}"}],
                max_tokens=200,
                temperature=0.7,
                seed=i,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
            )
            for i, schema in enumerate(map(strict, SCHEMAS))
        ]
        replies = await asyncio.gather(*jobs)
        await client.close()
        return replies

    replies = asyncio.run(ask_all())
    for schema, reply in zip(map(strict, SCHEMAS), replies):
        content = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop", (schema, content)
        value = json.loads(content)
        assert valid(value, schema), (schema, content)
        if isinstance(value, dict):  # keys come in the schema's order (as OpenAI's strict mode writes them)
            assert list(value) == [k for k in schema["properties"] if k in value], (schema, content)


def test_json_mode_regex_choice_and_errors(demo_server):
    def post(route, **body):
        return httpx.post(
            f"{demo_server}/v1/{route}", json={"model": "demo", "max_tokens": 60, **body}, timeout=120
        )

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    reply = post("chat/completions", **chat, response_format={"type": "json_object"}).json()["choices"][0]
    if reply["finish_reason"] == "stop":
        assert isinstance(json.loads(reply["message"]["content"]), dict)
    else:  # cut by max_tokens inside an open-ended object
        assert reply["message"]["content"].startswith("{")
    text = post("completions", prompt="Phone:", guided_regex=r"\+1-[0-9]{3}-[0-9]{4}").json()["choices"][0][
        "text"
    ]
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", text)
    choice = post("completions", prompt="Pick:", structured_outputs={"choice": ["alpha", "beta"]}).json()
    assert choice["choices"][0]["text"] in ("alpha", "beta")
    for grammar in ('start: "yes" | "no"', 'root ::= "yes" | "no"'):  # Lark and GBNF
        answer = post("completions", prompt="Ok?", structured_outputs={"grammar": grammar}).json()
        assert answer["choices"][0]["text"] in ("yes", "no")
    bad = post("completions", prompt="x", guided_regex="(unclosed")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"
    two = post("completions", prompt="x", guided_regex="a", guided_choice=["b"])
    assert two.status_code == 400 and "one structured output" in two.json()["error"]["message"]
    other = post("chat/completions", **chat, response_format={"type": "yaml"})
    assert other.status_code == 400 and other.json()["error"]["param"] == "response_format"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": STR,
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": STR}, "required": ["zone"]},
    },
}


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_follow_the_tool_schemas(demo_server, tool_choice):
    async def ask_all():
        client = AsyncOpenAI(base_url=demo_server + "/v1", api_key="none", max_retries=0, timeout=300)
        jobs = [
            client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": f"What is the weather in city number {i}?"}],
                tools=[WEATHER, CLOCK],
                tool_choice=tool_choice,
                parallel_tool_calls=False,
                max_tokens=120,
                temperature=0.8,
                seed=i,
            )
            for i in range(3)
        ]
        replies = await asyncio.gather(*jobs)
        await client.close()
        return replies

    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)}
    for reply in asyncio.run(ask_all()):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        if isinstance(tool_choice, dict):
            assert call.function.name == "get_weather"
        assert valid(json.loads(call.function.arguments), schemas[call.function.name]), call
