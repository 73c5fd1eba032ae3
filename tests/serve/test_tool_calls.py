import itertools
import json

import pytest

from nvfp4kit.serve.gemma_notation import NotationError, to_json
from nvfp4kit.serve.tool_calls import ToolCallStream, merge_call_deltas, parse_tool_calls

Q = '<|"|>'


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def test_value_encoding_to_json():
    text = (
        "{city:"
        + Q
        + 'Paris, "FR"'
        + Q
        + ",days:2,temp:-1.5,exp:1e3,ok:true,no:false,none:null,code:007,"
        + "tags:["
        + Q
        + "a"
        + Q
        + ","
        + Q
        + "b"
        + Q
        + "],nested:{deep:{x:1}},word:sunny}"
    )
    assert json.loads(to_json(text)) == {
        "city": 'Paris, "FR"',
        "days": 2,
        "temp": -1.5,
        "exp": 1000.0,
        "ok": True,
        "no": False,
        "none": None,
        "code": "007",
        "tags": ["a", "b"],
        "nested": {"deep": {"x": 1}},
        "word": "sunny",
    }


@pytest.mark.parametrize("bad", ["{a:1", "{a:}", "{a:" + Q + "x" + Q + " b:2}", "{,}", "{a:1}}"])
def test_bad_notation_raises(bad):
    with pytest.raises(NotationError):
        to_json(bad)


def test_single_call():
    content, calls = parse_tool_calls(
        "<|tool_call>call:get_weather{city:" + Q + "Paris" + Q + ",days:2}<tool_call|>", make_id=ids()
    )
    assert content == ""
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_0", "get_weather", {"city": "Paris", "days": 2})
    ]


def test_several_calls_same_function_get_distinct_indices_and_ids():
    text = (
        "Checking both.<|tool_call>call:get_weather{city:" + Q + "Paris" + Q + "}<tool_call|>"
        "<|tool_call>call:get_weather{city:" + Q + "Rome" + Q + "}<tool_call|>"
    )
    content, calls = parse_tool_calls(text, make_id=ids())
    assert content == "Checking both."
    assert [c.id for c in calls] == ["call_0", "call_1"]
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]


def test_variants_and_non_calls():
    # No closing marker (the model ended with <turn|> instead), `:NAME` header, empty arguments.
    _, calls = parse_tool_calls("<|tool_call>:ping{}", make_id=ids())
    assert [(c.name, c.arguments) for c in calls] == [("ping", "{}")]
    # A header that is not a call stays content.
    text = "see <|tool_call>not a call"
    assert parse_tool_calls(text) == (text, [])
    text = "<|tool_call>call:bad name{a:1}"
    assert parse_tool_calls(text) == (text, [])


def test_cut_off_call_keeps_the_sent_prefix():
    _, calls = parse_tool_calls("<|tool_call>call:f{a:" + Q + "hel", make_id=ids())
    assert calls[0].arguments == '{"a": "hel'


def test_broken_arguments_end_the_call_and_drop_its_rest():
    content, calls = parse_tool_calls(
        "<|tool_call>call:f{a:" + Q + "x" + Q + " b:2}<tool_call|>after", make_id=ids()
    )
    assert calls[0].arguments == '{"a": "x"'
    assert content == "after"


STREAM_CASES = [
    "<|tool_call>call:get_weather{city:" + Q + "Paris" + Q + ",days:2}<tool_call|>",
    "Text first.<|tool_call>call:a{x:[1,{y:"
    + Q
    + "z"
    + Q
    + "}],w:true}<tool_call|><|tool_call>call:b{}<tool_call|>",
    "<|tool_call>call:f{q:" + Q + "with <| and {braces}" + Q + ",n:-3.25}",
    "<|tool_call>call:f{a:" + Q + "cut",
    "<|tool_call>call:f{a:" + Q + "x" + Q + " b:2}<tool_call|>tail",
    "<|tool_call>call:f{a:1 b:2}<tool_call|>tail",
    "no calls at all, <|tool_ maybe",
    "<|tool_call>call:f{a:1,}<tool_call|>",
]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_streaming_matches_whole_text_at_every_split(text):
    want_content, want_calls = parse_tool_calls(text, make_id=ids())
    for cut in range(len(text) + 1):
        for second_cut in range(cut, len(text) + 1, 2):
            stream = ToolCallStream(make_id=ids())
            events = [
                stream.feed(text[:cut]),
                stream.feed(text[cut:second_cut]),
                stream.feed(text[second_cut:]),
            ]
            events.append(stream.finish())
            assert "".join(e.content for e in events) == want_content
            deltas = [d for e in events for d in e.calls]
            assert merge_call_deltas(deltas) == want_calls
            # Only the first delta of each call names it; indices are call ordinals.
            assert [d.index for d in deltas if d.name] == list(range(len(want_calls)))


def test_arguments_stream_before_the_call_ends():
    stream = ToolCallStream(make_id=ids())
    first = stream.feed("<|tool_call>call:f{text:" + Q + "hello wor")
    assert first.calls[0].name == "f"
    assert "".join(d.arguments for d in first.calls) == '{"text": "hello wor'
