"""Responses API input -> chat request: message items, tool round trips, reasoning items, tools, formats."""

import pytest

from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.responses_input import (
    ResponsesRequest,
    chat_messages,
    chat_request,
    chat_tool_choice,
    chat_tools,
    renamed_error,
    response_format,
)


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


def test_parallel_calls_join_one_assistant_turn_and_reasoning_attaches_to_it():
    items = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Two."}],
        },
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "w",
            "arguments": '{"city": "Paris"}',
            "id": "fc_1",
        },
        {
            "type": "function_call",
            "call_id": "c2",
            "name": "w",
            "arguments": '{"city": "Rome"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "c1", "output": "20"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "25"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "20 and 25.", "annotations": []}]},
    ]
    messages = chat_messages(request(input=items, instructions="Be brief."))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    turn = messages[2]
    assert turn["reasoning_content"] == "Two." and turn["content"] is None
    assert [c["id"] for c in turn["tool_calls"]] == ["c1", "c2"]
    assert turn["tool_calls"][1]["function"] == {"name": "w", "arguments": '{"city": "Rome"}'}
    assert messages[4] == {"role": "tool", "tool_call_id": "c2", "content": "25"}
    assert messages[5] == {"role": "assistant", "content": [{"type": "text", "text": "20 and 25."}]}


def test_text_then_call_in_one_turn_and_a_summary_as_the_thought():
    items = [
        {"role": "user", "content": "Hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Greet, then look up."}]},
        {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
    ]
    (_, turn) = chat_messages(request(input=items))
    assert turn["content"] == "Let me check." and turn["reasoning_content"] == "Greet, then look up."
    assert turn["tool_calls"][0]["id"] == "c1"


def test_images_become_chat_image_parts():
    part = {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}
    (message,) = chat_messages(request(input=[{"role": "user", "content": [part]}]))
    assert message["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]


def test_tools_tool_choice_and_formats_map_to_the_chat_shapes():
    tool = {
        "type": "function",
        "name": "f",
        "description": "d",
        "parameters": {"type": "object"},
        "strict": True,
    }
    assert chat_tools([tool]) == [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    ]
    assert chat_tool_choice({"type": "function", "name": "f"}) == {
        "type": "function",
        "function": {"name": "f"},
    }
    assert chat_tool_choice("required") == "required"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = request(
        input="x", text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}}
    )
    assert response_format(text.text) == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema, "strict": True},
    }
    assert response_format(request(input="x", text={"format": {"type": "json_object"}}).text) == {
        "type": "json_object"
    }
    assert response_format(request(input="x", text={"format": {"type": "text"}}).text) is None


def test_chat_request_carries_the_sampling_settings():
    chat = chat_request(
        request(input="Hi", max_output_tokens=7, temperature=0.3, top_p=0.9, reasoning={"effort": "low"})
    )
    assert chat.max_tokens == 7 and chat.temperature == 0.3 and chat.top_p == 0.9
    assert chat.chat_template_kwargs == {"enable_thinking": True}  # any effort but none / minimal thinks
    assert chat_request(request(input="Hi")).chat_template_kwargs == {"enable_thinking": False}
    for effort in ("none", "minimal"):  # as the chat route's reasoning_effort
        assert chat_request(request(input="Hi", reasoning={"effort": effort})).chat_template_kwargs == {
            "enable_thinking": False
        }


@pytest.mark.parametrize(
    "item, words",
    [
        ({"role": "tool", "content": "x"}, "role must be"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "needs call_id"),
        ({"type": "function_call_output", "output": "x"}, "call_id"),
        ({"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}, "not file_id"),
        ({"type": "computer_call"}, "computer_call"),
    ],
)
def test_bad_items_are_refused_naming_the_item(item, words):
    with pytest.raises(APIError) as caught:
        chat_messages(request(input=[item]))
    assert words in caught.value.message and caught.value.param.startswith("input[0]")


def test_unsupported_options_are_refused():
    for fields, param in [
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"tools": [{"type": "function", "name": "f", "extra": 1}]}, "tools[0]"),
        ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
    ]:
        with pytest.raises(APIError) as caught:
            parsed = request(input="Hi", **fields)
            parsed.check()
            chat_request(parsed)
        assert caught.value.param == param, fields
    request(input="Hi", include=["reasoning.encrypted_content"], store=True, truncation="disabled").check()


def test_chat_errors_are_renamed_to_this_routes_fields():
    error = renamed_error(APIError("max_tokens is 9, lower max_tokens", param="max_tokens"))
    assert (
        error.message == "max_output_tokens is 9, lower max_output_tokens"
        and error.param == "max_output_tokens"
    )
    assert renamed_error(APIError("bad", param="messages.0.content")).param == "input.0.content"


def test_long_string_input_is_one_message_and_item_lists_are_bounded():
    assert chat_messages(request(input="x" * 20_000)) == [{"role": "user", "content": "x" * 20_000}]
    with pytest.raises(ValueError, match="at most 10000 items"):
        request(input=[{"role": "user", "content": "x"}] * 10_001)
