"""Tool calling and thinking through the HTTP server with the official client, against a scripted model
that writes exactly what Gemma 4 writes."""

import json

import httpx
from openai import OpenAI

Q = '<|"|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
THOUGHT = "The user wants the weather, so I call the tool."
CALL = "<|tool_call>call:get_weather{city:" + Q + "Paris" + Q + ",days:2}<tool_call|>"
RESULT = "<|tool_response>response:get_weather{value:" + Q + '{"temp": 20}' + Q + "}<tool_response|>"


def weather_model(prompt: str) -> str:
    if RESULT in prompt:  # after the result, thinking on: the prompt reopened the thought channel
        return (
            "Reading the result.<channel|>" if prompt.endswith("<|channel>thought\n") else ""
        ) + "It is 20 C in Paris."
    thought = "<|channel>thought\n" + THOUGHT + "<channel|>" if "<|think|>" in prompt else ""
    return thought + CALL


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_tool_round_trip_with_thinking(scripted_server):
    base_url, engine = scripted_server(weather_model)
    api = client(base_url)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    first = api.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], extra_body=thinking
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == THOUGHT and choice.message.reasoning == THOUGHT
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'})
    second = api.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], extra_body=thinking
    )
    assert second.choices[0].message.content == "It is 20 C in Paris."
    assert second.choices[0].message.reasoning_content == "Reading the result."
    assert second.choices[0].finish_reason == "stop"
    # The model saw its call, the result in its own turn, and a reopened thought channel.
    assert engine.prompts[-1].endswith(
        "<|tool_call>call:get_weather{city:"
        + Q
        + "Paris"
        + Q
        + ",days:2}<tool_call|>"
        + RESULT
        + "<|channel>thought\n"
    )
    assert "<|channel>thought\n" + THOUGHT + "\n<channel|>" in engine.prompts[-1]


def test_streamed_tool_call_matches_the_non_streamed_one(scripted_server):
    base_url, _ = scripted_server(weather_model)
    api = client(base_url)
    request = dict(
        model="scripted",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    whole = api.chat.completions.create(**request).choices[0]
    with api.chat.completions.stream(**request) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    for got, want in zip(streamed.message.tool_calls, whole.message.tool_calls, strict=True):
        assert (got.function.name, got.function.arguments) == (want.function.name, want.function.arguments)
    reasoning = ""
    for chunk in api.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
    assert reasoning == THOUGHT


def test_parallel_calls_to_one_function_stream_with_their_own_index(scripted_server):
    two_calls = (
        "<|tool_call>call:get_weather{city:" + Q + "Paris" + Q + "}<tool_call|>"
        "<|tool_call>call:get_weather{city:" + Q + "Rome" + Q + "}<tool_call|>"
    )
    base_url, _ = scripted_server(lambda prompt: two_calls)
    api = client(base_url)
    request = dict(
        model="scripted", messages=[{"role": "user", "content": "Paris and Rome?"}], tools=[WEATHER_TOOL]
    )
    arguments: dict[int, str] = {}
    ids: dict[int, str] = {}
    for chunk in api.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
                if delta.id:
                    ids[delta.index] = delta.id
    assert {i: json.loads(a)["city"] for i, a in arguments.items()} == {0: "Paris", 1: "Rome"}
    assert len(set(ids.values())) == 2
    whole = api.chat.completions.create(**request).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in whole] == ["Paris", "Rome"]
    single = api.chat.completions.create(**request, parallel_tool_calls=False).choices[0].message.tool_calls
    assert len(single) == 1


def test_named_and_required_tool_choice_prefill_the_call(scripted_server):
    def model(prompt: str) -> str:
        if prompt.endswith("<|tool_call>call:get_weather{"):
            return "city:" + Q + "Rome" + Q + "}<tool_call|>"
        if prompt.endswith("<|tool_call>call:"):
            return "get_weather{city:" + Q + "Oslo" + Q + "}<tool_call|>"
        return "I would rather chat."

    base_url, engine = scripted_server(model)
    api = client(base_url)
    messages = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    result = api.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], tool_choice=named
    )
    assert result.choices[0].finish_reason == "tool_calls"
    assert json.loads(result.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    result = api.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert json.loads(result.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    streamed = api.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], tool_choice=named, stream=True
    )
    deltas = [d for chunk in streamed for c in chunk.choices for d in (c.delta.tool_calls or ())]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Rome"}
    result = api.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert result.choices[0].message.content == "I would rather chat."
    assert "<|tool>declaration" not in engine.prompts[-1]


def test_thinking_off_prefills_an_empty_thought_and_reports_no_reasoning(scripted_server):
    base_url, engine = scripted_server(lambda prompt: "Hello!")
    api = client(base_url)
    result = api.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
    assert engine.prompts[-1].endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert result.choices[0].message.content == "Hello!"
    assert getattr(result.choices[0].message, "reasoning_content", None) is None
    api.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Hi"}], reasoning_effort="high"
    )
    assert "<|think|>" in engine.prompts[-1]


def test_reply_cut_inside_the_thought_is_all_reasoning(scripted_server):
    base_url, _ = scripted_server(
        lambda prompt: "<|channel>thought\nthinking for a long long time<channel|>Done"
    )
    raw = httpx.post(
        base_url + "/v1/chat/completions",
        json={
            "model": "scripted",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 20,
        },
    ).json()
    message = raw["choices"][0]["message"]
    assert raw["choices"][0]["finish_reason"] == "length"
    assert (
        message["content"] == "" and message["reasoning_content"] == "thinking fo"
    )  # 1 marker + 8 label + 11 bytes
