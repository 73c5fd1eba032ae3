import pytest

from nvfp4kit.serve.reasoning import ReasoningStream, prompt_opens_reasoning, split_reasoning

CASES = [
    # (output, starts_in_reasoning, expected reasoning, expected content)
    (
        "<|channel>thought\nLet me think.<channel|>The answer is 4.",
        False,
        "Let me think.",
        "The answer is 4.",
    ),
    ("<|channel>thought\n<channel|>Hi there", False, "", "Hi there"),
    ("Just an answer.", False, None, "Just an answer."),
    ("<|channel>thought\nstill thinking when it stopped", False, "still thinking when it stopped", ""),
    ("continued reasoning<channel|>Final.", True, "continued reasoning", "Final."),
    ("only reasoning, cut off", True, "only reasoning, cut off", ""),
    (
        "<|channel>thought\nNeed a tool.<|tool_call>call:f{}<tool_call|>",
        False,
        "Need a tool.",
        "<|tool_call>call:f{}<tool_call|>",
    ),
    ("Answer<channel|> with a stray marker", False, None, "Answer with a stray marker"),
    ("<|channel>thought<channel|>No newline label", False, "", "No newline label"),
    ("<|channel>plain reasoning without label<channel|>x", False, "plain reasoning without label", "x"),
    ("a < b and <|chan is not a marker", False, None, "a < b and <|chan is not a marker"),
    ("<|channel>thought\nA<channel|>B<|channel>thought\nC<channel|>D", False, "AC", "BD"),
    ("", False, None, ""),
    ("", True, "", ""),
]


@pytest.mark.parametrize(("output", "starts", "reasoning", "content"), CASES)
def test_split_reasoning(output, starts, reasoning, content):
    assert split_reasoning(output, starts_in_reasoning=starts) == (reasoning, content)


@pytest.mark.parametrize(("output", "starts", "reasoning", "content"), CASES)
def test_streaming_matches_whole_text_at_every_split(output, starts, reasoning, content):
    for cut in range(len(output) + 1):
        for second_cut in range(cut, len(output) + 1, 3):
            stream = ReasoningStream(starts_in_reasoning=starts)
            pieces = [
                stream.feed(output[:cut]),
                stream.feed(output[cut:second_cut]),
                stream.feed(output[second_cut:]),
            ]
            pieces.append(stream.finish())
            assert "".join(p.reasoning for p in pieces) == (reasoning or "")
            assert "".join(p.content for p in pieces) == content


def test_streaming_one_character_at_a_time_never_leaks_markers():
    output = "<|channel>thought\nabc<channel|>def"
    stream = ReasoningStream()
    seen = [stream.feed(ch) for ch in output] + [stream.finish()]
    assert all("<" not in p.content and "<" not in p.reasoning for p in seen)
    assert "".join(p.reasoning for p in seen) == "abc"


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning(
        "<|turn>model\n<|tool_response>response:f{}<tool_response|><|channel>thought\n"
    )
    assert not prompt_opens_reasoning("<|turn>model\n<|channel>thought\n<channel|>")
    assert not prompt_opens_reasoning("<|turn>model\n")
