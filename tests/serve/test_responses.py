"""`POST /v1/responses` through the HTTP server with the official client: a scripted Gemma 4 (thinking, tool
calls, exact prompts) and the tiny random checkpoint (the real engine: budgets, greedy streams)."""

import json

import httpx
import openai
import pytest
from openai import OpenAI

from .conftest import API_KEY

Q = '<|"|>'
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
THOUGHT = "The user wants the weather, so I call the tool."
CALL = "<|tool_call>call:get_weather{city:" + Q + "Paris" + Q + "}<tool_call|>"
RESULT = "<|tool_response>response:get_weather{value:" + Q + '{"temp": 20}' + Q + "}<tool_response|>"
ANSWER = "It is 20 C in Paris."
HELLO = "Hello there, friend."


def scripted_model(prompt: str) -> str:
    """Thinks when the prompt asks for it; calls the weather tool for a weather question, answers after it."""
    if RESULT in prompt:
        return ANSWER
    thought = "<|channel>thought\n" + THOUGHT + "<channel|>" if "<|think|>" in prompt else ""
    return thought + (CALL if "Weather" in prompt.rsplit("<|turn>user", 1)[-1] else HELLO)


def client(base_url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def sse_events(base_url: str, body: dict, headers: dict | None = None) -> list[dict]:
    """The data objects of a streamed response, checking each `event:` line names its data's type."""
    events = []
    with httpx.stream("POST", base_url + "/v1/responses", json=body, headers=headers, timeout=60) as reply:
        assert reply.status_code == 200
        name = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
                assert data["type"] == name
                events.append(data)
    return events


def test_string_input_gives_one_message(scripted_server):
    base_url, engine = scripted_server(scripted_model)
    response = client(base_url).responses.create(model="scripted", input="Hi")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == HELLO
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert engine.prompts[-1].startswith("<bos><|turn>user\nHi<turn|>\n<|turn>model\n")
    assert response.usage.input_tokens == len(engine.prompt_ids[-1])
    assert response.usage.output_tokens == len(engine.tokenizer.encode(HELLO, add_bos=False)) + 1  # + <turn|>
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert "<|think|>" not in engine.prompts[-1]  # no reasoning field: thinking off


def test_instructions_and_message_items_render_as_the_chat_route_does(scripted_server):
    base_url, engine = scripted_server(scripted_model)
    api = client(base_url)
    items = [
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": "And again?"},
    ]
    response = api.responses.create(model="scripted", instructions="Be brief.", input=items, temperature=0.5)
    assert response.output_text == HELLO and response.instructions == "Be brief."
    assert response.temperature == 0.5
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And again?"},
    ]
    api.chat.completions.create(model="scripted", messages=messages)
    assert engine.prompts[-2] == engine.prompts[-1]
    assert engine.prompts[-1].index("Be brief.") < engine.prompts[-1].index("Answer in English.")


def test_reasoning_effort_turns_thinking_on_and_returns_the_thought(scripted_server):
    base_url, engine = scripted_server(scripted_model)
    response = client(base_url).responses.create(model="scripted", input="Hi", reasoning={"effort": "low"})
    assert "<|think|>" in engine.prompts[-1]
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text == THOUGHT
    assert response.output_text == HELLO and response.reasoning.effort == "low"
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    client(base_url).responses.create(model="scripted", input="Hi", reasoning={"effort": "none"})
    assert "<|think|>" not in engine.prompts[-1]


def test_stream_events_build_the_same_response(scripted_server):
    base_url, _ = scripted_server(scripted_model)
    body = {"model": "scripted", "input": "Hi", "reasoning": {"effort": "high"}, "stream": True}
    events = sse_events(base_url, body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    expected_frame = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
    ]
    assert kinds[:5] == expected_frame
    assert kinds[-5:] == [
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    message_start = kinds.index("response.output_item.added", 1 + kinds.index("response.reasoning_text.done"))
    assert kinds[kinds.index("response.reasoning_text.delta") : message_start] == [
        *["response.reasoning_text.delta"] * (kinds.index("response.reasoning_text.done") - 4),
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[message_start + 1] == "response.content_part.added"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert text == HELLO and thought == THOUGHT
    final = events[-1]["response"]
    assert final["status"] == "completed" and [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][1]["content"][0]["text"] == text
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == final["output"]
    assert {e["response"]["id"] for e in events if "response" in e} == {final["id"]}

    unstreamed = client(base_url).responses.create(model="scripted", input="Hi", reasoning={"effort": "high"})
    assert [i.model_dump(exclude={"id"}, exclude_none=True) for i in unstreamed.output] == [
        {k: v for k, v in i.items() if k != "id"} for i in final["output"]
    ]
    # the SDK's stream helper accumulates the same answer
    with client(base_url).responses.stream(model="scripted", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert stream.get_final_response().output_text == "".join(deltas) == HELLO


def test_tool_call_round_trip(scripted_server):
    base_url, engine = scripted_server(scripted_model)
    api = client(base_url)
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    first = api.responses.create(model="scripted", input=conversation, tools=[WEATHER_TOOL])
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
    assert first.status == "completed" and first.tools[0].name == "get_weather"

    conversation += [item.model_dump(exclude_none=True) for item in first.output]
    conversation.append({"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 20}'})
    second = api.responses.create(model="scripted", input=conversation, tools=[WEATHER_TOOL])
    assert second.output_text == ANSWER
    assert CALL + RESULT in engine.prompts[-1]
    chat_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    messages = [
        conversation[0],
        {"role": "assistant", "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 20}'},
    ]
    chat_tool = {
        "type": "function",
        "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
    }
    api.chat.completions.create(model="scripted", messages=messages, tools=[chat_tool])
    assert engine.prompts[-1] == engine.prompts[-2]  # the same prompt as the chat route's

    events = sse_events(
        base_url, {"model": "scripted", "input": "Weather?", "tools": [WEATHER_TOOL], "stream": True}
    )
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [(i["type"], i["name"], i["arguments"]) for i in added] == [("function_call", "get_weather", "")]
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert arguments == done["arguments"] and json.loads(arguments) == {"city": "Paris"}
    assert events[-1]["response"]["output"][0]["arguments"] == arguments


def test_reasoning_items_sent_back_reach_the_prompt(scripted_server):
    base_url, engine = scripted_server(scripted_model)
    api = client(base_url)
    first = api.responses.create(
        model="scripted", input="Weather in Paris?", tools=[WEATHER_TOOL], reasoning={"effort": "medium"}
    )
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    conversation += [item.model_dump(exclude_none=True) for item in first.output]
    conversation.append(
        {"type": "function_call_output", "call_id": first.output[1].call_id, "output": '{"temp": 20}'}
    )
    api.responses.create(
        model="scripted", input=conversation, tools=[WEATHER_TOOL], reasoning={"effort": "medium"}
    )
    assert "<|channel>thought\n" + THOUGHT + "\n<channel|>" + CALL + RESULT in engine.prompts[-1]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"input": "Hi", "frobnicate": 1}, "frobnicate", "Extra inputs"),
        ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]", "function tools only"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "item_reference"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "input[0].content",
            "input_audio",
        ),
        ({"input": "Hi", "max_output_tokens": 100_000}, "max_output_tokens", "max_output_tokens is 100000"),
        ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format", "yaml"),
        ({"input": "Hi", "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"input": []}, "input", "empty"),
    ],
)
def test_refused_requests_name_the_field(scripted_server, body, param, words):
    base_url, engine = scripted_server(scripted_model)
    reply = httpx.post(base_url + "/v1/responses", json={"model": "scripted", **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert engine.prompts == []


def test_a_failing_request_ends_alone(scripted_server):
    def model(prompt: str) -> str:
        if "boom" in prompt:
            raise RuntimeError("the engine broke on this prompt")
        return HELLO

    base_url, _ = scripted_server(model)
    api = client(base_url)
    with pytest.raises(openai.InternalServerError, match="the engine broke"):
        api.responses.create(model="scripted", input="boom")
    with pytest.raises(openai.APIError, match="the engine broke"):
        list(api.responses.create(model="scripted", input="boom", stream=True))
    assert api.responses.create(model="scripted", input="Hi").output_text == HELLO


def test_sdk_stream_helper_with_a_function_call_and_echoed_settings(scripted_server):
    base_url, _ = scripted_server(scripted_model)
    request = dict(
        model="scripted",
        input="Weather?",
        tools=[WEATHER_TOOL],
        metadata={"trace": "t1"},
        user="u1",
        store=False,
        parallel_tool_calls=False,
    )
    with client(base_url).responses.stream(**request) as stream:
        argument_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and call.arguments == "".join(argument_deltas)
    assert call.parsed_arguments == {"city": "Paris"}  # strict tool: the SDK parses the arguments
    assert final.metadata == {"trace": "t1"} and final.user == "u1" and final.store is False
    assert final.parallel_tool_calls is False and final.tool_choice == "auto"


# The tiny random checkpoint behind the real `nvfp4kit serve` process (shared with tests/serve/test_server.py).


def test_max_output_tokens_makes_the_response_incomplete(server):
    api = client(server, API_KEY)
    response = api.responses.create(model="tiny", input="Hi", max_output_tokens=3, temperature=0.0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.max_output_tokens == 3
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 3, "temperature": 0.0, "stream": True}
    events = sse_events(server, body, headers)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert streamed == response.output_text  # greedy: the same three tokens


def test_real_model_stream_through_the_sdk_equals_the_response(server):
    api = client(server, API_KEY)
    request = dict(model="tiny", input=[{"role": "user", "content": "Tell me a story"}], max_output_tokens=12)
    whole = api.responses.create(**request, temperature=0.0)
    events = list(api.responses.create(**request, temperature=0.0, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens == 12


def test_forced_function_call_with_the_real_model(server):
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    response = client(server, API_KEY).responses.create(
        model="tiny",
        input="Hi",
        tools=[tool],
        tool_choice={"type": "function", "name": "lookup"},
        max_output_tokens=8,
        temperature=0.0,
    )
    assert response.output[0].type == "function_call" and response.output[0].name == "lookup"
    assert response.tool_choice.name == "lookup"


def test_json_schema_text_format_constrains_the_real_model(server):
    schema = {"type": "string", "enum": ["yes", "no"]}
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    response = client(server, API_KEY).responses.create(
        model="tiny", input="Yes or no?", text=text, max_output_tokens=16, temperature=0.0
    )
    assert response.status == "completed" and json.loads(response.output_text) in ("yes", "no")
    assert response.text.format.type == "json_schema"
