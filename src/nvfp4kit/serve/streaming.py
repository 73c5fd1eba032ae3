"""Pieces shared by the chat and text completion handlers: running the n choices of a request as one
token stream, the token budget check, logprob entries, and server-sent-event framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from nvfp4kit.llm import TokenEvent
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.engine_protocol import AsyncEngine
from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.metrics import ServerMetrics
from nvfp4kit.vision.inputs import ImageInputs

_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens with this value
_END = object()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def token_budget(
    prompt_tokens: int, requested: int | None, max_model_len: int, *, prompt_param: str = "messages"
) -> int:
    """max_tokens for a request: what was asked if it fits, else a 400 that says what fits."""
    room = max_model_len - prompt_tokens
    if room < 1:
        what = "prompt" if prompt_param == "prompt" else f"prompt ({prompt_param})"
        raise APIError(
            f"the prompt is {prompt_tokens} tokens but the model's context is {max_model_len} tokens "
            f"(room is needed for at least one generated token); shorten the {what}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room
    if requested > room:
        raise APIError(
            f"max_tokens is {requested}, but the prompt is {prompt_tokens} tokens and the context is "
            f"{max_model_len} tokens, so at most {room} tokens can be generated; lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def token_text(engine: AsyncEngine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id])


def chat_logprob(engine: AsyncEngine, event: TokenEvent, *, as_id: bool = False) -> dict[str, Any]:
    """One entry of `choices[].logprobs.content` for a chat completion; `as_id`: tokens named "token_id:N"
    (return_tokens_as_token_ids; `bytes` then spell that name, as vLLM's do)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = f"token_id:{token_id}" if as_id else token_text(engine, token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}

    return {
        **entry(event.token_id, event.logprob),
        "top_logprobs": [entry(t, lp) for t, lp in event.top_logprobs],
    }


def is_token(event: TokenEvent) -> bool:
    """False for the closing event of an aborted request, which carries no token (id -1)."""
    return event.token_id >= 0


def is_stop_token(engine: AsyncEngine, event: TokenEvent, params: SamplingParams) -> bool:
    """The token that ended generation by being a stop id: it adds no text and is not reported in logprobs."""
    stop_ids = set(params.stop_token_ids or ()) | set(engine.stop_token_ids)
    return event.finish_reason == "stop" and not event.text and event.token_id in stop_ids


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def stream_choices(
    engine: AsyncEngine,
    metrics: ServerMetrics,
    prompt_ids: list[int],
    params: list[SamplingParams],
    *,
    arrival: float,
    images: ImageInputs | None = None,
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, token) for all choices of one prompt, interleaved as they come."""
    jobs = [(prompt_ids, choice_params) for choice_params in params]
    async with contextlib.aclosing(
        stream_jobs(engine, metrics, jobs, arrival=arrival, images=images)
    ) as events:
        async for index, event in events:
            yield index, event


async def stream_jobs(
    engine: AsyncEngine,
    metrics: ServerMetrics,
    jobs: list[tuple[list[int], SamplingParams]],
    *,
    arrival: float,
    images: ImageInputs | None = None,
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(job index, token) for engine requests submitted all at once (choices and prompts of one HTTP request),
    interleaved as they come, so the engine batches them together.

    A job that fails raises here, which ends the whole HTTP request; closing this iterator (the client went
    away, or a sibling failed) aborts every job still generating.
    """
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt_ids: list[int], job_params: SamplingParams) -> None:
        previous: float | None = None
        try:
            extra = {"images": images} if images is not None else {}  # engines without images work too
            submitted = time.perf_counter()
            metrics.submitted(submitted - arrival)
            async with contextlib.aclosing(engine.stream(prompt_ids, job_params, **extra)) as tokens:
                async for event in tokens:
                    now = time.perf_counter()
                    first = previous is None
                    metrics.token(
                        since_previous=None if first else now - previous,
                        since_arrival=now - arrival if first else None,
                        since_submitted=now - submitted if first else None,
                    )
                    previous = now
                    merged.put_nowait((index, event))
            merged.put_nowait((index, _END))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            merged.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await merged.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` when the prefix cache served some prompt."""
    out: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
