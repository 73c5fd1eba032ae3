"""`POST /v1/responses`: OpenAI's Responses API on top of the chat route.

The input items become chat messages and the flattened function tools become chat tools, so the prompt is
rendered, tokenized and constrained by `ChatHandler.prepare` exactly as a chat request would be (Gemma 4
template, thinking, forced tool calls, structured output). The reply is parsed by the chat parser and laid
out as Responses output items (`serve/responses_stream.py`); the request side is `serve/responses_input.py`. Nothing is stored: `previous_response_id` and
item references are refused, the client sends the whole conversation each time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nvfp4kit.serve.chat import ChatHandler, PreparedChat
from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.responses_input import ResponsesRequest, chat_request, renamed_error
from nvfp4kit.serve.responses_stream import Event, OutputBuilder, item_id, sse_event
from nvfp4kit.serve.streaming import is_token, stream_choices

ENDPOINT = "responses"


@dataclass
class PreparedResponse:
    request: ResponsesRequest
    chat: PreparedChat
    id: str
    created_at: int


class ResponsesHandler:
    """prepare / complete / stream, the interface `serve/app.py` drives every route through."""

    def __init__(self, chat: ChatHandler) -> None:
        self.chat = chat

    def prepare(self, request: ResponsesRequest, *, model: str) -> PreparedResponse:
        """Validate, convert and render (on the prepare pool); raises APIError (4xx) for the client to fix."""
        request.check()
        try:
            prepared = self.chat.prepare(chat_request(request), model=model)
        except APIError as exc:
            raise renamed_error(exc) from exc
        return PreparedResponse(request, prepared, item_id("resp"), int(time.time()))

    async def complete(self, prepared: PreparedResponse) -> dict[str, Any]:
        """The finished `response` object."""
        final: dict[str, Any] = {}
        async with contextlib.aclosing(self._events(prepared)) as events:
            async for event in events:
                final = event.get("response", final)
        return final

    async def stream(self, prepared: PreparedResponse) -> AsyncIterator[str]:
        """Server-sent events, numbered from 0, from response.created to response.completed (or .incomplete)."""
        sequence = 0
        async with contextlib.aclosing(self._events(prepared)) as events:
            async for event in events:
                yield sse_event({"type": event["type"], "sequence_number": sequence, **event})
                sequence += 1

    async def _events(self, prepared: PreparedResponse) -> AsyncIterator[Event]:
        chat, engine, metrics = prepared.chat, self.chat.engine, self.chat.metrics
        started = self._response(prepared, status="in_progress", output=[])
        yield {"type": "response.created", "response": started}
        yield {"type": "response.in_progress", "response": started}
        parser, builder = chat.new_parser(), OutputBuilder()
        for event in builder.add(parser.feed(chat.prefill)):
            yield event
        generated = reasoning_tokens = 0
        cached, finish = None, None
        metrics.add_prompt_tokens(len(chat.prompt_ids))
        tokens = stream_choices(
            engine, metrics, chat.prompt_ids, chat.params, arrival=chat.arrival, images=chat.images
        )
        async with contextlib.aclosing(tokens) as stream:
            async for _, token in stream:
                generated += is_token(token)
                if getattr(token, "cached_tokens", None) is not None:
                    cached = token.cached_tokens
                delta = parser.feed(token.text)
                if token.finish_reason:
                    finish = token.finish_reason
                    delta.extend(parser.finish())
                # a token whose text went only to the thought counts as a reasoning token
                reasoning_tokens += is_token(token) and bool(delta.reasoning) and not delta.content
                for event in builder.add(delta):
                    yield event
        if finish is None:
            for event in builder.add(parser.finish()):
                yield event
        metrics.add_cached_tokens(cached or 0)
        status = {"length": "incomplete", "abort": "cancelled"}.get(finish or "stop", "completed")
        for event in builder.finish(status="incomplete" if status != "completed" else "completed"):
            yield event
        usage = {
            "input_tokens": len(chat.prompt_ids),
            "input_tokens_details": {"cached_tokens": cached or 0},
            "output_tokens": generated,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": len(chat.prompt_ids) + generated,
        }
        final = self._response(prepared, status=status, output=builder.items, usage=usage)
        yield {
            "type": "response.completed" if status == "completed" else "response.incomplete",
            "response": final,
        }

    def _response(
        self, prepared: PreparedResponse, *, status: str, output: list[dict[str, Any]], usage: Any = None
    ) -> dict[str, Any]:
        """The `response` object, echoing the request's settings the way OpenAI's does."""
        request = prepared.request
        effort = request.reasoning.effort if request.reasoning else None
        return {
            "id": prepared.id,
            "object": "response",
            "created_at": prepared.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {},
            "model": prepared.chat.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": effort, "summary": None},
            "store": False,  # nothing is kept, so nothing can be retrieved later
            "temperature": request.temperature,
            "text": {"format": (request.text.format if request.text else None) or {"type": "text"}},
            "tool_choice": request.tool_choice or "auto",
            "tools": request.tools or [],
            "top_p": request.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": request.user,
        }
