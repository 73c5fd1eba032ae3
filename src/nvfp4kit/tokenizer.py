"""The checkpoint's tokenizer (`tokenizer.json`), with special tokens kept when decoding.

Gemma 4's thinking and tool-call markers (`<|channel>`, `<|tool_call>`, ...) are special tokens; decoding
without them would make the parsers blind, so `decode` keeps them always.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self._tok = _HFTokenizer.from_file(str(file))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token")) or "<bos>"
        self.bos_id = self._tok.token_to_id(self.bos_token)
        self.chat_template = _read_chat_template(folder, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; a <bos> is prepended unless asked not to or the text starts with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas without re-emitting or splitting UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._context = list(prompt_ids[-4:]) if prompt_ids else []  # byte-level merges can span the boundary

    def push(self, token_id: int, *, final: bool = False) -> str:
        """Add a token; returns the new text. An incomplete UTF-8 tail waits for the next token unless final."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self._context)
        full = self.tokenizer.decode(self._context + self.ids)
        if full.endswith("\ufffd") and not final:
            return ""
        new_text = full[len(prefix) :]
        delta = new_text[len(self.text) :]
        self.text = new_text
        return delta


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(folder: Path, config: dict) -> str | None:
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # the named-templates form
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
