"""Turn one choice's generated text into chat fields: reasoning, content and tool calls.

The reasoning splitter runs first; its answer text goes through the tool-call parser when tools are in
play. Used token by token for streaming and on the whole text otherwise (same code, same result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nvfp4kit.serve.reasoning import ReasoningSplit, ReasoningStream
from nvfp4kit.serve.tool_calls import ToolCallDelta, ToolCallStream, merge_call_deltas


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ChatDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls

    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)

    def as_openai_delta(self) -> dict[str, Any]:
        """The `delta` object of a streamed chunk (first call deltas carry id, type and name)."""
        delta: dict[str, Any] = {}
        if self.reasoning:
            delta["reasoning_content"] = self.reasoning
            delta["reasoning"] = self.reasoning
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [_call_delta(d) for d in self.tool_calls]
        return delta


def _call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    if delta.name is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {
        "index": delta.index,
        "id": delta.id,
        "type": "function",
        "function": {"name": delta.name, "arguments": delta.arguments},
    }


class ChatOutputParser:
    """Incremental parser for one choice; `max_calls` drops calls beyond it (parallel_tool_calls=false)."""

    def __init__(self, *, starts_in_reasoning: bool, parse_tools: bool, max_calls: int | None = None) -> None:
        self._reasoning = ReasoningStream(starts_in_reasoning=starts_in_reasoning)
        self._tools = ToolCallStream() if parse_tools else None
        self._max_calls = max_calls
        self.all = ChatDelta()

    def feed(self, text: str) -> ChatDelta:
        return self._route(self._reasoning.feed(text), final=False)

    def finish(self) -> ChatDelta:
        return self._route(self._reasoning.finish(), final=True)

    def _route(self, split: ReasoningSplit, *, final: bool) -> ChatDelta:
        delta = ChatDelta(reasoning=split.reasoning)
        if self._tools is None:
            delta.content = split.content
        else:
            events = self._tools.feed(split.content)
            delta.content = events.content
            delta.tool_calls = events.calls
            if final:
                last = self._tools.finish()
                delta.content += last.content
                delta.tool_calls += last.calls
            if self._max_calls is not None:
                delta.tool_calls = [d for d in delta.tool_calls if d.index < self._max_calls]
        self.all.extend(delta)
        return delta

    def message(self) -> dict[str, Any]:
        """The non-streamed `message` for everything parsed so far (call after `finish`)."""
        calls = merge_call_deltas(self.all.tool_calls)
        message: dict[str, Any] = {"role": "assistant", "content": self.all.content}
        if calls and not self.all.content.strip():
            message["content"] = None
        if self.all.reasoning:
            message["reasoning_content"] = self.all.reasoning
            message["reasoning"] = self.all.reasoning
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        return message

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.all.tool_calls)
