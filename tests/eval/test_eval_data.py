import json

import pytest

from nvfp4kit.eval.data import DEFAULT_DATA, EvalDataError, load_samples, read_texts, token_windows
from nvfp4kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from nvfp4kit.testing.tiny import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return Tokenizer(folder)


def test_jsonl_and_plain_text_files(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "source": "x"}\n')
    plain = tmp_path / "b.txt"
    plain.write_text("a whole file\nof text\n")
    assert read_texts(jsonl) == ["one", "two"]
    assert read_texts(plain) == ["a whole file\nof text\n"]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        read_texts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2"):
        read_texts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(EvalDataError, match=r"broken.jsonl:1: not valid JSON"):
        read_texts(broken)


def test_windows_start_with_bos_and_go_round_robin(tokenizer):
    long, short = "x" * 100, "y" * 40  # byte-level tokenizer: one token a character
    windows = token_windows([long, short], tokenizer, num_samples=10, seq_len=33)
    assert all(w[0] == tokenizer.bos_id and len(w) <= 33 for w in windows)
    # first windows of both texts come before the second window of the long one
    firsts = [tokenizer.decode(w[1:])[0] for w in windows[:2]]
    assert firsts == ["x", "y"]
    # 100 x's in windows of 32 -> 32, 32, 32, 4 (dropped: under 16); 40 y's -> 32, 8 (dropped)
    assert [len(w) - 1 for w in windows] == [32, 32, 32, 32]
    assert len(token_windows([long, short], tokenizer, num_samples=2, seq_len=33)) == 2


def test_settings_are_checked(tokenizer):
    with pytest.raises(EvalDataError, match="seq_len"):
        token_windows(["abc"], tokenizer, num_samples=1, seq_len=4)
    with pytest.raises(EvalDataError, match="num_samples"):
        token_windows(["abc" * 20], tokenizer, num_samples=0, seq_len=32)
    with pytest.raises(EvalDataError, match="no window"):
        token_windows(["abc"], tokenizer, num_samples=4, seq_len=32)


def test_default_heldout_slice_ships_with_the_package(tokenizer):
    assert DEFAULT_DATA.is_file()
    records = [json.loads(line) for line in DEFAULT_DATA.read_text().splitlines()]
    sources = {r["source"].split(":")[0] for r in records}
    assert sources == {"stdlib", "pydoc-topic", "synthetic-chat"}
    samples = load_samples(None, tokenizer, num_samples=8, seq_len=64)
    assert len(samples) == 8
