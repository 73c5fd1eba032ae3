"""Parse Gemma 4 tool calls, `<|tool_call>call:NAME{key:value,...}<tool_call|>`, into OpenAI tool calls.

Arguments are turned into JSON text (see `gemma_notation`). A call ends at the brace that closes its
arguments; the `<tool_call|>` after it is optional, because some checkpoints end with `<turn|>` or
`<eos>` instead. `<|tool_call>:NAME{...}` (no `call`) is accepted too. Text that does not form a call
(a header without a valid name, or an output cut inside the header) is returned as content unchanged.
Arguments that stop being valid notation end the call there: the call keeps the JSON sent so far and the
rest of that call's text is dropped.

One state machine serves both uses, so the streamed deltas of any chunking concatenate to the
non-streamed result: the first delta of a call carries its `index` (the call's ordinal in the reply),
`id` and `name`; the later ones carry argument text only.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from nvfp4kit.serve.gemma_notation import NotationError, to_json_prefix

TOOL_CALL_OPEN = "<|tool_call>"
TOOL_CALL_CLOSE = "<tool_call|>"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_MAX_HEADER = 256  # characters between `<|tool_call>` and `{` before we give up on it being a call

_TEXT, _HEADER, _ARGS, _AFTER, _SKIP = "text", "header", "args", "after", "skip"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one call: the first piece has id and name, the rest only argument text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ToolCallEvents:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def _held_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _call_name(header: str) -> str | None:
    """The function name from the text between `<|tool_call>` and `{`, or None if it is not a call."""
    header = header.strip()
    if header.startswith("call:"):
        header = header[len("call:") :]
    elif header.startswith(":"):
        header = header[1:]
    else:
        return None
    header = header.strip()
    return header if _NAME.fullmatch(header) else None


class ToolCallStream:
    """Incremental tool-call parser: feed content deltas, get plain content and call deltas back."""

    def __init__(self, *, make_id: Callable[[], str] = new_call_id) -> None:
        self._make_id = make_id
        self._state = _TEXT
        self._pending = ""
        self._args = ""
        self._sent = 0
        self.count = 0

    def feed(self, delta: str) -> ToolCallEvents:
        self._pending += delta
        events = ToolCallEvents()
        while self._pending and self._step(events, final=False):
            pass
        return events

    def finish(self) -> ToolCallEvents:
        """Release held text at the end of the output."""
        events = ToolCallEvents()
        while self._pending or self._state in (_ARGS, _HEADER):
            self._step(events, final=True)
        return events

    def _step(self, events: ToolCallEvents, *, final: bool) -> bool:
        """Consume what can be decided now; False when more text is needed."""
        text = self._pending
        if self._state == _TEXT:
            at = text.find(TOOL_CALL_OPEN)
            if at >= 0:
                events.content += text[:at]
                self._pending = text[at + len(TOOL_CALL_OPEN) :]
                self._state = _HEADER
                return True
            held = 0 if final else _held_suffix(text, TOOL_CALL_OPEN)
            events.content += text[: len(text) - held]
            self._pending = text[len(text) - held :]
            return not held
        if self._state == _HEADER:
            return self._read_header(events, final=final)
        if self._state == _ARGS:
            return self._read_arguments(events, final=final)
        if self._state == _AFTER:
            if text.startswith(TOOL_CALL_CLOSE):
                self._pending = text[len(TOOL_CALL_CLOSE) :]
            elif TOOL_CALL_CLOSE.startswith(text) and not final:
                return False
            self._state = _TEXT
            return True
        # _SKIP: drop the rest of a broken call, up to its closing marker.
        at = text.find(TOOL_CALL_CLOSE)
        if at >= 0:
            self._pending = text[at + len(TOOL_CALL_CLOSE) :]
            self._state = _TEXT
            return True
        held = 0 if final else _held_suffix(text, TOOL_CALL_CLOSE)
        self._pending = text[len(text) - held :]
        return not held

    def _read_header(self, events: ToolCallEvents, *, final: bool) -> bool:
        text = self._pending
        brace = text.find("{")
        stop = min((i for i in (text.find("\n"), text.find("<")) if i >= 0), default=-1)
        if brace < 0 or (0 <= stop < brace):
            undecided = stop < 0 and len(text) <= _MAX_HEADER and not final
            if undecided:
                return False
            # Not a call after all: give the marker and the text back as content.
            events.content += TOOL_CALL_OPEN
            self._state = _TEXT
            return True
        name = _call_name(text[:brace])
        if name is None:
            events.content += TOOL_CALL_OPEN
            self._state = _TEXT
            return True
        events.calls.append(ToolCallDelta(self.count, "", id=self._make_id(), name=name))
        self._args = ""
        self._sent = 0
        self._pending = text[brace:]
        self._state = _ARGS
        return True

    def _read_arguments(self, events: ToolCallEvents, *, final: bool) -> bool:
        self._args += self._pending
        self._pending = ""
        try:
            rendered = to_json_prefix(self._args)
            broken_at = None
        except NotationError as exc:
            rendered = to_json_prefix(self._args[: exc.position])
            broken_at = exc.position
        if len(rendered.text) > self._sent:
            events.calls.append(ToolCallDelta(self.count, rendered.text[self._sent :]))
            self._sent = len(rendered.text)
        if broken_at is not None:
            self._pending = self._args[broken_at:]
            self._state = _SKIP
        elif rendered.complete:
            self._pending = self._args[rendered.end :]
            self._state = _AFTER
        elif final:
            self._state = _TEXT  # output ended inside the arguments: the call keeps what was sent
        else:
            return False
        self.count += 1
        return True


def merge_call_deltas(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Join streamed deltas into whole calls, the way an OpenAI client accumulates them."""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
        if delta.id is not None:
            call["id"] = delta.id
        if delta.name is not None:
            call["name"] = delta.name
        call["arguments"] += delta.arguments
    return [ToolCall(**calls[index]) for index in sorted(calls)]


def parse_tool_calls(text: str, *, make_id: Callable[[], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """Split a whole reply into (content outside the calls, the calls in order)."""
    stream = ToolCallStream(make_id=make_id)
    first = stream.feed(text)
    last = stream.finish()
    return first.content + last.content, merge_call_deltas(first.calls + last.calls)
