"""The `output` items of a Responses API answer, built from the chat parser's deltas, with the stream events
that build them.

One builder serves both uses: the streamed route sends every event, the non-streamed one keeps only the
finished items, so both give the same output. Items follow the model's text: a `reasoning` item for the
thought, a `message` item for the answer, one `function_call` item per call. A message opens only once the
answer has more than whitespace, so the blank line Gemma 4 writes before a call makes no empty message.
"""

from __future__ import annotations

import copy
import json
import secrets
from typing import Any

from nvfp4kit.serve.chat_output import ChatDelta
from nvfp4kit.serve.tool_calls import ToolCallDelta

Event = dict[str, Any]


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def sse_event(event: Event) -> str:
    """One server-sent event as OpenAI sends them: the type on an `event:` line and the JSON on `data:`."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class OutputBuilder:
    """Feed ChatDeltas with `add`, then call `finish` once; `items` is the response's `output`."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""  # text of the open reasoning or message item
        self._held_space = ""  # answer whitespace not yet in a message

    def add(self, delta: ChatDelta) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning:
            self._reasoning(delta.reasoning, events)
        if delta.content:
            self._content(delta.content, events)
        for call in delta.tool_calls:
            self._call(call, events)
        return events

    def finish(self, *, status: str = "completed") -> list[Event]:
        """Close the open item (`status` "incomplete" when generation was cut); an answer with no item at all
        gets an empty message, so clients always find one."""
        events: list[Event] = []
        if not self.items:
            self._open_message(events)
            if self._held_space:  # a whitespace-only answer is still the answer
                self._content("", events)
        self._close(events, status=status)
        return events

    def _kind(self) -> str | None:
        return None if self._open is None else self._open["type"]

    def _start(self, item: dict[str, Any], events: list[Event]) -> None:
        self._close(events)
        self.items.append(item)
        self._open = item
        self._text = ""
        events.append(
            {"type": "response.output_item.added", "output_index": self._index(), "item": _copy(item)}
        )

    def _index(self) -> int:
        return len(self.items) - 1

    def _part_event(self, kind: str, part: dict[str, Any]) -> Event:
        return {
            "type": kind,
            "item_id": self._open["id"],
            "output_index": self._index(),
            "content_index": 0,
            "part": part,
        }

    def _reasoning(self, text: str, events: list[Event]) -> None:
        if self._kind() != "reasoning":
            item = {
                "id": item_id("rs"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            self._start(item, events)
            events.append(
                self._part_event("response.content_part.added", {"type": "reasoning_text", "text": ""})
            )
        self._text += text
        events.append({**self._delta_fields(), "type": "response.reasoning_text.delta", "delta": text})

    def _content(self, text: str, events: list[Event]) -> None:
        if self._kind() != "message":
            if not text.strip():
                self._held_space += text
                return
            self._open_message(events)
        text, self._held_space = self._held_space + text, ""
        self._text += text
        events.append(
            {**self._delta_fields(), "type": "response.output_text.delta", "delta": text, "logprobs": []}
        )

    def _open_message(self, events: list[Event]) -> None:
        item = {
            "id": item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self._start(item, events)
        events.append(self._part_event("response.content_part.added", _output_text("")))

    def _call(self, call: ToolCallDelta, events: list[Event]) -> None:
        if call.name is not None:  # the first piece of a call opens its item
            item = {
                "id": item_id("fc"),
                "type": "function_call",
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
                "status": "in_progress",
            }
            self._start(item, events)
            self._held_space = ""
        if not call.arguments or self._kind() != "function_call":
            return
        self._open["arguments"] += call.arguments
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": self._open["id"],
                "output_index": self._index(),
                "delta": call.arguments,
            }
        )

    def _delta_fields(self) -> Event:
        return {"item_id": self._open["id"], "output_index": self._index(), "content_index": 0}

    def _close(self, events: list[Event], *, status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        kind = item["type"]
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": self._text}
            events.append(
                {**self._delta_fields(), "type": "response.reasoning_text.done", "text": self._text}
            )
            events.append(self._part_event("response.content_part.done", part))
            item["content"] = [part]
        elif kind == "message":
            part = _output_text(self._text)
            events.append(
                {
                    **self._delta_fields(),
                    "type": "response.output_text.done",
                    "text": self._text,
                    "logprobs": [],
                }
            )
            events.append(self._part_event("response.content_part.done", part))
            item["content"] = [part]
        else:
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": self._index(),
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
        item["status"] = status
        events.append(
            {"type": "response.output_item.done", "output_index": self._index(), "item": _copy(item)}
        )
        self._open = None


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """Events carry the item as it is now; the builder keeps changing its own copy."""
    return copy.deepcopy(item)
