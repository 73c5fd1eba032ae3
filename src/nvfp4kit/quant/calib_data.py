"""Calibration text: the built-in corpus or the user's files, tokenized and packed into fixed-length samples.

Files: `.jsonl` (one JSON object a line, with `text`, or `messages` as a list of {role, content} rendered in
Gemma 4's turn format), `.json` (a list of such objects or of strings), anything else read as UTF-8 text
(documents separated by blank lines). Documents are joined with a blank line and cut into samples of
`seq_len` tokens, each starting with <bos>; the last sample may be shorter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from nvfp4kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILTIN_CORPUS = "corpus.jsonl"
_ROLES = {"assistant": "model", "model": "model", "user": "user", "system": "system", "tool": "tool"}


class CalibrationDataError(ValueError):
    """A calibration file cannot be read or holds no usable text."""


def builtin_corpus_path() -> Path:
    return Path(str(resources.files("nvfp4kit") / "assets" / "calibration" / BUILTIN_CORPUS))


def render_messages(messages: Any, *, where: str) -> str:
    """A chat in Gemma 4's turn markup (`<|turn>role\\n...<turn|>`), as the model sees conversations."""
    if not isinstance(messages, list) or not messages:
        raise CalibrationDataError(f"{where}: 'messages' must be a non-empty list")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise CalibrationDataError(f"{where}: each message needs a string 'content'")
        role = _ROLES.get(str(m.get("role", "user")), "user")
        parts.append(f"<|turn>{role}\n{m['content']}<turn|>\n")
    return "".join(parts)


def _document(item: Any, *, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if isinstance(item.get("text"), str):
            return item["text"]
        if "messages" in item:
            return render_messages(item["messages"], where=where)
    raise CalibrationDataError(f"{where}: expected a string or an object with 'text' or 'messages'")


def read_documents(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"cannot read calibration file {path}: {exc}") from None
    docs: list[str]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
            docs.append(_document(item, where=f"{path} line {n}"))
    elif path.suffix == ".json":
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{path}: not valid JSON ({exc.msg})") from None
        if not isinstance(items, list):
            raise CalibrationDataError(f"{path}: expected a JSON list of documents")
        docs = [_document(item, where=f"{path} item {i}") for i, item in enumerate(items)]
    else:
        docs = [d.strip() for d in raw.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationDataError(f"calibration file {path} holds no text")
    return docs


def calibration_samples(
    tokenizer: Tokenizer,
    files: Sequence[str | Path] | None = None,
    *,
    num_samples: int,
    seq_len: int,
) -> list[list[int]]:
    """Up to `num_samples` token-id lists of `seq_len` tokens (the built-in corpus when `files` is empty)."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    paths = list(files) if files else [builtin_corpus_path()]
    separator = tokenizer.encode("\n\n", add_bos=False)
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    body = seq_len - len(head)
    samples: list[list[int]] = []
    current: list[int] = []
    for path in paths:
        for doc in read_documents(path):
            ids = tokenizer.encode(doc, add_bos=False) + separator
            while ids:
                take = body - len(current)
                current.extend(ids[:take])
                ids = ids[take:]
                if len(current) == body:
                    samples.append(head + current)
                    current = []
                    if len(samples) == num_samples:
                        return samples
    if current:
        samples.append(head + current)
    if len(samples) < num_samples:
        log.warning(
            "calibration data gives %d samples of up to %d tokens, fewer than the %d asked for",
            len(samples),
            seq_len,
            num_samples,
        )
    return samples
