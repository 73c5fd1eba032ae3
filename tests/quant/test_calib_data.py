"""Calibration data: file formats, packing into <bos>-led samples, the built-in corpus, and bad input."""

from __future__ import annotations

import json

import pytest

from nvfp4kit.quant.calib_data import (
    CalibrationDataError,
    builtin_corpus_path,
    calibration_samples,
    read_documents,
)
from nvfp4kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(bf16_checkpoint):
    return Tokenizer(bf16_checkpoint("moe"))


def test_samples_are_packed_and_start_with_bos(tokenizer, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("alpha beta\n\ngamma delta epsilon\n\n" + "zeta " * 40)
    samples = calibration_samples(tokenizer, [path], num_samples=3, seq_len=16)
    assert [len(s) for s in samples] == [16, 16, 16]
    assert all(s[0] == tokenizer.bos_id for s in samples)
    text = "".join(tokenizer.decode(s[1:]) for s in samples)
    assert text.startswith("alpha beta\n\ngamma delta epsilon\n\nzeta zeta")


def test_short_data_gives_fewer_samples(tokenizer, tmp_path, caplog):
    path = tmp_path / "short.txt"
    path.write_text("just a few words")
    samples = calibration_samples(tokenizer, [path], num_samples=4, seq_len=64)
    assert len(samples) == 1 and len(samples[0]) < 64
    assert "fewer than the 4 asked for" in caplog.text


def test_jsonl_text_and_messages(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        {"text": "plain document"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = read_documents(path)
    assert docs == ["plain document", "<|turn>user\nHi?<turn|>\n<|turn>model\nHello.<turn|>\n"]
    ids = calibration_samples(tokenizer, [path], num_samples=1, seq_len=200)[0]
    assert tokenizer.token_to_id("<|turn>") in ids and tokenizer.token_to_id("<turn|>") in ids


def test_json_list(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps(["one", {"text": "two"}]))
    assert read_documents(path) == ["one", "two"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "a.jsonl",
            '{"txt": "x"}\n',
            r"a.jsonl line 1: expected a string or an object with 'text' or 'messages'",
        ),
        ("b.jsonl", '{"messages": []}\n', r"b.jsonl line 1: 'messages' must be a non-empty list"),
        ("c.json", '{"text": "x"}', r"c.json: expected a JSON list of documents"),
        ("d.txt", "\n\n  \n", r"calibration file .*d.txt holds no text"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        read_documents(path)


def test_bad_sizes(tokenizer):
    with pytest.raises(CalibrationDataError, match="num_samples >= 1 and seq_len >= 2"):
        calibration_samples(tokenizer, num_samples=0, seq_len=16)


def test_builtin_corpus_is_shipped_and_varied(tokenizer):
    path = builtin_corpus_path()
    assert path.is_file() and path.stat().st_size < 400_000
    docs = read_documents(path)
    joined = "\n".join(docs)
    for marker in ("def ", "SELECT", "<|turn>model", "<|tool_call>", "<|channel>thought", "Le train", "地铁"):
        assert marker in joined, marker
    samples = calibration_samples(tokenizer, num_samples=8, seq_len=256)
    assert len(samples) == 8 and all(len(s) == 256 for s in samples)
