"""Evaluation text: files in, fixed token windows out (the same windows for both checkpoints).

A `.jsonl` file holds one record a line with a `text` field; any other file is one text. Each text is
tokenized with a leading <bos> and cut into consecutive windows of `seq_len` tokens (later windows get a
<bos> of their own). Windows are taken round-robin over texts (every text's first window, then every second
window, ...) so a small `num_samples` still covers every source.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvfp4kit.tokenizer import Tokenizer

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "heldout.jsonl"
MIN_WINDOW = 16  # shorter tails carry too few predictions to be worth a forward pass


class EvalDataError(ValueError):
    """An evaluation data file is missing, malformed, or yields no usable text."""


def read_texts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"evaluation data file {path} does not exist")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        return [text] if text.strip() else []
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EvalDataError(f"{path}:{number}: each line must be an object with a string 'text'")
        texts.append(record["text"])
    return texts


def token_windows(
    texts: list[str], tokenizer: Tokenizer, *, num_samples: int, seq_len: int
) -> list[list[int]]:
    """Up to `num_samples` windows of at most `seq_len` tokens, each starting with <bos>."""
    if seq_len < MIN_WINDOW:
        raise EvalDataError(f"seq_len must be at least {MIN_WINDOW}, got {seq_len}")
    if num_samples < 1:
        raise EvalDataError(f"num_samples must be at least 1, got {num_samples}")
    bos = tokenizer.bos_id
    per_text = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=False)
        body = seq_len - 1 if bos is not None else seq_len
        windows = [ids[i : i + body] for i in range(0, len(ids), body)]
        per_text.append([([bos] if bos is not None else []) + w for w in windows if len(w) >= MIN_WINDOW])
    samples: list[list[int]] = []
    depth = 0
    while len(samples) < num_samples and any(depth < len(w) for w in per_text):
        samples += [w[depth] for w in per_text if depth < len(w)][: num_samples - len(samples)]
        depth += 1
    if not samples:
        raise EvalDataError(f"the evaluation data yields no window of at least {MIN_WINDOW} tokens")
    return samples


def load_samples(
    files: list[str | Path] | None, tokenizer: Tokenizer, *, num_samples: int, seq_len: int
) -> list[list[int]]:
    """Token windows from `files` (default: the held-out slice shipped with nvfp4kit)."""
    texts = [t for f in (files or [DEFAULT_DATA]) for t in read_texts(f)]
    if not texts:
        raise EvalDataError(f"no text in {[str(f) for f in files or [DEFAULT_DATA]]}")
    return token_windows(texts, tokenizer, num_samples=num_samples, seq_len=seq_len)
