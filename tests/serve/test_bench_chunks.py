"""`bench serve` reads a streamed chunk as a token when it carries text, reasoning, a tool call or a token's
logprobs (a chat reply of markup the parsers hold back streams only logprobs)."""

from nvfp4kit.bench.serve_load_client import _chunk_text


def test_a_chunk_with_only_logprobs_is_a_token():
    held_back = {"choices": [{"index": 0, "delta": {}, "logprobs": {"content": [{"token": "<|channel>"}]}}]}
    assert _chunk_text(held_back) == (True, "")
    legacy = {"choices": [{"index": 0, "text": "", "logprobs": {"tokens": ["<pad>"]}}]}
    assert _chunk_text(legacy) == (True, "")


def test_role_and_empty_chunks_are_not_tokens():
    assert _chunk_text({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) == (
        False,
        "",
    )
    assert _chunk_text({"choices": [{"index": 0, "delta": {}, "logprobs": None}]}) == (False, "")
    assert _chunk_text({"choices": [{"index": 1, "text": "hi"}]}) == (True, "")  # only choice 0 is kept
