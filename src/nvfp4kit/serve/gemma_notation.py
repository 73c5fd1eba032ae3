"""Gemma 4's value notation (tool-call arguments) translated to JSON text, also from a prefix of the text.

Notation: strings between `<|"|>` delimiters, bare numbers, `true`/`false`/`null`, `[a,b]` lists and
`{key:value,...}` mappings with bare keys. Anything else bare is taken as a string, the way the model
sometimes writes short words unquoted.

`to_json_prefix` renders as much JSON as is already certain from a prefix of the text, so a streaming
parser can send argument text early: the prefix for a longer input always extends the prefix for a shorter
one, and for a complete value it equals `json.dumps(value, ensure_ascii=False)` of the decoded value.
Bare values are withheld until a delimiter ends them; a separator is sent only with the item after it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

STRING_DELIMITER = '<|"|>'
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_BARE_END = ",}]"
_WHITESPACE = " \t\r\n"


class NotationError(ValueError):
    """The text is not valid Gemma value notation; `position` is where it went wrong."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at character {position}")
        self.position = position


@dataclass(frozen=True)
class JsonPrefix:
    """JSON rendered so far; `end` is where a complete value stopped in the input (None while incomplete)."""

    text: str
    end: int | None

    @property
    def complete(self) -> bool:
        return self.end is not None


def decode_bare(token: str) -> Any:
    """A bare (unquoted) value: booleans, null, JSON numbers; anything else stays the string itself."""
    if token in ("true", "false"):
        return token == "true"
    if token == "null":
        return None
    match = _NUMBER.fullmatch(token)
    if match:
        return float(token) if (match.group(1) or match.group(2)) else int(token)
    return token


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _partial_marker_tail(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _render_string(text: str, pos: int) -> JsonPrefix:
    start = pos + len(STRING_DELIMITER)
    close = text.find(STRING_DELIMITER, start)
    if close >= 0:
        return JsonPrefix(json.dumps(text[start:close], ensure_ascii=False), close + len(STRING_DELIMITER))
    body = text[start:]
    body = body[: len(body) - _partial_marker_tail(body, STRING_DELIMITER)]
    return JsonPrefix('"' + json.dumps(body, ensure_ascii=False)[1:-1], None)


def _render_bare(text: str, pos: int) -> JsonPrefix:
    end = pos
    while end < len(text) and text[end] not in _BARE_END and not text.startswith(STRING_DELIMITER, end):
        end += 1
    if end == len(text):
        return JsonPrefix("", None)  # a bare value may still grow
    token = text[pos:end].strip()
    if not token:
        raise NotationError("missing value", pos)
    return JsonPrefix(json.dumps(decode_bare(token), ensure_ascii=False), end)


def _read_key(text: str, pos: int) -> tuple[str | None, int]:
    """A mapping key and the position after its colon; (None, pos) while the key is still incomplete."""
    if text.startswith(STRING_DELIMITER, pos):
        close = text.find(STRING_DELIMITER, pos + len(STRING_DELIMITER))
        if close < 0:
            return None, pos
        key = text[pos + len(STRING_DELIMITER) : close]
        after = _skip_space(text, close + len(STRING_DELIMITER))
        if after == len(text):
            return None, pos
        if text[after] != ":":
            raise NotationError("expected ':' after a key", after)
        return key, after + 1
    end = pos
    while end < len(text) and text[end] != ":":
        if text[end] in "{}[],":
            raise NotationError(f"unexpected {text[end]!r} in a key", end)
        end += 1
    if end == len(text):
        return None, pos
    key = text[pos:end].strip()
    if not key:
        raise NotationError("empty key", pos)
    return key, end + 1


def _render_container(text: str, pos: int, *, mapping: bool) -> JsonPrefix:
    opener, closer = ("{", "}") if mapping else ("[", "]")
    out = opener
    pos += 1
    count = 0
    while True:
        pos = _skip_space(text, pos)
        if pos == len(text):
            return JsonPrefix(out, None)
        if text[pos] == closer:
            return JsonPrefix(out + closer, pos + 1)
        if count:
            if text[pos] != ",":
                raise NotationError(f"expected ',' or {closer!r}", pos)
            pos = _skip_space(text, pos + 1)
            if pos == len(text):
                return JsonPrefix(out, None)
            if text[pos] == closer:  # trailing comma
                return JsonPrefix(out + closer, pos + 1)
        separator = ", " if count else ""
        head = ""
        if mapping:
            key, pos = _read_key(text, pos)
            if key is None:
                return JsonPrefix(out, None)
            head = json.dumps(key, ensure_ascii=False) + ": "
            pos = _skip_space(text, pos)
            if pos == len(text):
                return JsonPrefix(out + separator + head, None)
        item = _render_value(text, pos)
        if not item.complete:
            started = head or item.text
            return JsonPrefix(out + (separator + head + item.text if started else ""), None)
        out += separator + head + item.text
        pos = item.end
        count += 1


def _render_value(text: str, pos: int) -> JsonPrefix:
    pos = _skip_space(text, pos)
    if pos == len(text):
        return JsonPrefix("", None)
    if text.startswith(STRING_DELIMITER, pos):
        return _render_string(text, pos)
    if STRING_DELIMITER.startswith(text[pos:]):
        return JsonPrefix("", None)  # the text ends inside an opening delimiter
    if text[pos] == "{":
        return _render_container(text, pos, mapping=True)
    if text[pos] == "[":
        return _render_container(text, pos, mapping=False)
    if text[pos] in "}],:":
        raise NotationError(f"unexpected {text[pos]!r}", pos)
    return _render_bare(text, pos)


def to_json_prefix(text: str, start: int = 0) -> JsonPrefix:
    """JSON for the value that starts at `start`, as far as it is certain. Raises NotationError."""
    return _render_value(text, start)


def to_json(text: str) -> str:
    """JSON text of one complete value in Gemma notation; raises NotationError if incomplete or invalid."""
    rendered = _render_value(text, 0)
    if not rendered.complete:
        raise NotationError("incomplete value", len(text))
    if _skip_space(text, rendered.end) != len(text):
        raise NotationError("unexpected text after the value", rendered.end)
    return rendered.text
