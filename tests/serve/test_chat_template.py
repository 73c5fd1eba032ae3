import json

import pytest

from nvfp4kit.prompting.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    prepare_messages,
    validate_tools,
)
from nvfp4kit.testing.tiny import write_tokenizer

Q = '<|"|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
DECLARATION = (
    "<|tool>declaration:get_weather{description:" + Q + "Get weather" + Q + ",parameters:{properties:{city:"
    "{description:"
    + Q
    + "City"
    + Q
    + ",type:"
    + Q
    + "STRING"
    + Q
    + "},days:{type:"
    + Q
    + "INTEGER"
    + Q
    + "}},"
    "required:[" + Q + "city" + Q + "],type:" + Q + "OBJECT" + Q + "}}<tool|>"
)
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
}
TOOL_LOOP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "Need tool.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
]
CALL_AND_RESULT = (
    "<|turn>model\n<|channel>thought\nNeed tool.\n<channel|><|tool_call>call:get_weather{city:"
    + Q
    + "Paris"
    + Q
    + ",days:2}<tool_call|><|tool_response>response:get_weather{value:"
    + Q
    + '{"temp": 20}'
    + Q
    + "}<tool_response|>"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def template(folder):
    return load_chat_template(folder)


def render(template, messages, **kwargs):
    tools = kwargs.pop("tools", None)
    return template.render(messages, tools=tools, template_kwargs=kwargs)


def test_user_only_thinking_off_prefills_an_empty_thought(template):
    text = render(template, [{"role": "user", "content": "Hi"}])
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_system_and_thinking(template):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render(template, messages, enable_thinking=True)
    assert text == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_earlier_reasoning_is_dropped(template):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
        {"role": "user", "content": "2+2?"},
    ]
    text = render(template, messages, enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\n2+2?<turn|>\n<|turn>model\n"
    )


def test_tool_loop_thinking_on_reopens_the_channel(template):
    text = render(template, TOOL_LOOP, tools=[WEATHER_TOOL], enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\n"
        + DECLARATION
        + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n"
        + CALL_AND_RESULT
        + "<|channel>thought\n"
    )


def test_tool_loop_thinking_off_continues_the_turn(template):
    text = render(template, TOOL_LOOP, tools=[WEATHER_TOOL])
    assert text == (
        "<bos><|turn>system\n"
        + DECLARATION
        + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n"
        + CALL_AND_RESULT
    )


def test_call_without_result_ends_in_tool_response_marker(template):
    text = template.render(TOOL_LOOP[:2], tools=[WEATHER_TOOL], add_generation_prompt=False)
    assert text.endswith("<tool_call|><|tool_response>")


def test_final_answer_after_tool_result_closes_the_turn(template):
    messages = [
        *TOOL_LOOP,
        {"role": "assistant", "content": "It is 20 C."},
        {"role": "user", "content": "Thanks"},
    ]
    text = render(template, messages, tools=[WEATHER_TOOL])
    assert "<tool_response|>It is 20 C.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n" in text
    assert "Need tool." not in text  # reasoning before the last user message is gone


def test_messages_are_not_modified(template):
    messages = json.loads(json.dumps(TOOL_LOOP))
    render(template, messages, tools=[WEATHER_TOOL])
    assert messages == TOOL_LOOP


CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], None, {}),
    (
        [
            {"role": "developer", "content": " Rules. "},
            {"role": "user", "content": [{"type": "text", "text": "A"}]},
        ],
        None,
        {},
    ),
    (TOOL_LOOP, [WEATHER_TOOL], {"enable_thinking": True}),
    (TOOL_LOOP, [WEATHER_TOOL], {"enable_thinking": False}),
    (
        [*TOOL_LOOP, {"role": "assistant", "content": "<|channel>thought\nx<channel|>20 C"}],
        [WEATHER_TOOL],
        {},
    ),
    (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        None,
        {"enable_thinking": True},
    ),
]


@pytest.mark.parametrize(("messages", "tools", "kwargs"), CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_renders_the_same(folder, template, messages, tools, kwargs, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(folder)
    ours = template.render(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, template_kwargs=kwargs
    )
    theirs = hf.apply_chat_template(
        prepare_messages(messages),
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    assert ours == theirs


def test_bad_arguments_and_unknown_tool_call_id():
    bad = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
            ],
        },
    ]
    with pytest.raises(
        ChatTemplateError, match=r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON"
    ):
        prepare_messages(bad)
    orphan = [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]
    with pytest.raises(ChatTemplateError, match="matches no earlier assistant tool call"):
        prepare_messages(orphan)
    with pytest.raises(ChatTemplateError, match="messages is empty"):
        prepare_messages([])


def test_template_is_sandboxed():
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(ChatTemplateError):
        mutate.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate("{% if %}")


def test_template_raise_exception_becomes_a_clear_error(template):
    with pytest.raises(ChatTemplateError, match="Unknown message role wizard"):
        template.render([{"role": "wizard", "content": "x"}])


def test_template_from_tokenizer_config_and_builtin_fallback(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "chat_template": [{"name": "default", "template": "{{ bos_token }}!"}],
            }
        )
    )
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>!"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "(built-in)" in load_chat_template(empty).origin
    with pytest.raises(FileNotFoundError, match="no chat_template"):
        load_chat_template(empty, fallback_to_builtin=False)


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([{"type": "retrieval"}], r"tools\[0\] must be an object with type 'function'"),
        ([{"type": "function", "function": {"name": "bad name"}}], r"tools\[0\].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "type 'object'"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}], "properties"),
        ([WEATHER_TOOL, WEATHER_TOOL], "more than once: get_weather"),
    ],
)
def test_validate_tools(tools, message):
    with pytest.raises(ChatTemplateError, match=message):
        validate_tools(tools)
    validate_tools([WEATHER_TOOL])
