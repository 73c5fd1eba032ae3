"""A chat re-sends its whole history every turn; `SegmentCache` tokenizes only the text it has not seen between
control tokens. The ids must be exactly the tokenizer's own for the whole text, on every call."""

import json
import random
import shutil

import pytest

from nvfp4kit.demo import demo_model_path
from nvfp4kit.tokenizer import SegmentCache, Tokenizer

PIECES = [
    "def f(x):\n",
    "    return x",
    "  ",
    " ",
    "\n\n",
    "Ünïcode — ",
    "12345",
    "héllo wörld",
    "a",
    "\t",
    "?!",
]


def whole_text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids


def random_text(rng: random.Random, controls: list[str], parts: int) -> str:
    return "".join(
        rng.choice(controls) if controls and rng.random() < 0.2 else rng.choice(PIECES) for _ in range(parts)
    )


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo_model_path())


def test_long_texts_get_the_tokenizers_own_ids_cached_or_not(tokenizer):
    assert tokenizer._segments is not None
    controls = sorted(tokenizer.special_tokens)
    rng = random.Random(0)
    texts = [random_text(rng, controls, 1500) for _ in range(6)]
    for _ in range(2):  # the second round reads every piece from the cache
        for text in texts:
            assert len(text) >= SegmentCache.MIN_CHARS
            assert tokenizer.encode(text, add_bos=False) == whole_text_ids(tokenizer, text)


def test_a_growing_chat_reuses_its_earlier_turns(tokenizer):
    rng = random.Random(1)
    history = ""
    for turn in range(4):
        user = random_text(rng, [], 400)
        history += f"<|turn>user\n{user}<turn|>\n<|turn>model\nreply {turn}<turn|>\n"
        hits = tokenizer._segments.hits
        assert tokenizer.encode(history, add_bos=False) == whole_text_ids(tokenizer, history)
        if turn:  # every earlier message came from the cache
            assert tokenizer._segments.hits - hits >= 2 * turn


def test_the_cache_keeps_to_its_character_budget(tokenizer, monkeypatch):
    cache = SegmentCache.for_tokenizer(
        tokenizer._tok, tokenizer.special_token_pattern, tokenizer.special_tokens
    )
    monkeypatch.setattr(SegmentCache, "MAX_CHARS", 20_000)
    rng = random.Random(2)
    for _ in range(20):
        text = random_text(rng, ["<turn|>"], 600)
        assert cache.encode(text) == whole_text_ids(tokenizer, text)
        assert cache._chars <= SegmentCache.MAX_CHARS
        assert cache._chars == sum(map(len, cache._cache))


def test_added_tokens_that_strip_spaces_turn_the_cache_off(tokenizer, tmp_path):
    source = demo_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    turn_close = next(t for t in spec["added_tokens"] if t["content"] == "<turn|>")
    turn_close["lstrip"] = True  # "text <turn|>" then loses the space before the token: not split-exact
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    stripping = Tokenizer(tmp_path)
    assert stripping._segments is None
    text = "words before <turn|> and after " * 200
    assert stripping.encode(text, add_bos=False) == whole_text_ids(stripping, text)
    assert stripping.encode(text, add_bos=False) != tokenizer.encode(text, add_bos=False)
