"""The engine behind the server: continuous batching on a worker thread, an async token stream per request.

The worker owns the `Engine` (nothing else touches it): it takes new requests and aborts from a command
queue between steps, runs `step()` while there is work, and hands a step's events to the event loop in one
call. The worker only steps the model and hands out token ids: each request's stream turns them into text
and checks stop strings on the event loop (`TextOutput`, a short-window decode per token), and a stop string
found there aborts the request in the engine. Closing a stream early (a client that went away) aborts the
request and frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from nvfp4kit.engine.engine import Engine
from nvfp4kit.engine.request import TokenEvent
from nvfp4kit.engine.text_output import TextOutput
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.vision.inputs import ImageInputs

log = logging.getLogger(__name__)
_DONE = object()


class RequestFailed(RuntimeError):
    """This request (alone) failed inside the engine; the message says why."""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_global_usage: float = 0.0
    kv_sliding_usage: float = 0.0
    prefill_tokens: int = 0  # prompt tokens run through the model so far (prompt minus prefix-cache hits)
    preemptions: int = 0  # requests pushed back to the queue because the KV pools ran short
    background: int = 0  # background requests (history warm-ups) running or waiting: not in the two above
    steps: tuple[
        tuple[str, int, float, float], ...
    ] = ()  # (kind, steps, wall s, device s): engine/step_stats.py


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def push(self, item: object) -> None:
        _deliver(self.loop, [(self.queue, item)])


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Hand items to their queues on `loop`: one wake-up of the loop for a whole step's events."""
    with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for target, item in items:
        target.put_nowait(item)


class AsyncBatchingEngine:
    """`stream(prompt_ids, params)` for many concurrent requests, batched together by one `Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.stop_token_ids = frozenset(engine.model.config.eos_token_ids)
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stats = EngineStats(0, 0)
        self._prefill_tokens = 0  # counted on the event loop from each request's first event
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="nvfp4kit-engine", daemon=True)
        self._worker.start()

    def stats(self) -> EngineStats:
        return replace(self._stats, prefill_tokens=self._prefill_tokens)

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        images: ImageInputs | None = None,
        *,
        background: bool = False,
    ) -> AsyncIterator[TokenEvent]:
        """`background`: the server's own work, which yields to the clients' requests (`engine/scheduler.py`)."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        request_id = f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        detokenize = self.tokenizer is not None and params.detokenize
        text = TextOutput(self.tokenizer, prompt_ids, params) if detokenize else None
        self._commands.put(("add", request_id, list(prompt_ids), params, stream, images, background))
        finished = False  # by the engine: else the engine still holds the request, and closing aborts it
        try:
            while True:
                item = await stream.queue.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                if item.cached_tokens is not None:  # the first token: its prompt was computed but the hits
                    self._prefill_tokens += len(prompt_ids) - item.cached_tokens
                if text is not None and _adds_text(item):
                    item.text, stopped = text.push(item.token_id, final=item.finish_reason == "length")
                    if stopped:  # a stop string: this request ends here, the engine's copy is aborted
                        item.finish_reason = "stop"
                yield item
                if item.finish_reason:
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def _work(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            try:
                while True:
                    command = self._commands.get(block=block, timeout=None)
                    block = False
                    if command is None:
                        return
                    self._apply(command)
            except queue.Empty:
                pass
            if not engine.has_unfinished():
                continue
            try:
                events = engine.step()
            except Exception as exc:  # fail the requests in flight, keep serving new ones
                log.exception("engine step failed")
                for request_id, stream in list(self._streams.items()):
                    engine.abort(request_id)
                    stream.push(exc)
                self._streams.clear()
                continue
            self._refresh_stats()  # before the events: a client that saw its last token reads this step counted
            self._hand_out(events)

    def _hand_out(self, events: list[TokenEvent]) -> None:
        """A step's events to their streams, one call per event loop (not one per token)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            item = RequestFailed(event.error) if event.error else event
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
            if event.finish_reason:
                del self._streams[event.request_id]
        for loop, items in by_loop.items():
            _deliver(loop, items)

    def _refresh_stats(self) -> None:
        s = self.engine.stats()
        self._stats = EngineStats(
            int(s["running"]), int(s["waiting"]), s["kv_global_usage"], s["kv_sliding_usage"],
            preemptions=int(s["preemptions"]), background=int(s["background"]),
            steps=self.engine.step_stats.snapshot(),
        )  # fmt: skip

    def _apply(self, command: tuple) -> None:
        try:
            self._apply_one(command)
        finally:
            self._refresh_stats()  # an abort may leave the engine idle: the gauges must say so now

    def _apply_one(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params, stream, images, background = command
            try:
                # ids only: the stream detokenizes and checks stop strings on the event loop
                ids_only = replace(params, detokenize=False)
                self.engine.add_request(
                    prompt_ids, ids_only, request_id=request_id, images=images, background=background
                )
            except ValueError as exc:
                stream.push(exc)
                return
            self._streams[request_id] = stream
        elif command[0] == "abort":
            self.engine.abort(command[1])
            self._streams.pop(command[1], None)
        elif command[0] == "abort_all":
            for request_id, stream in list(self._streams.items()):
                self.engine.abort(request_id)
                stream.push(_abort_event(request_id))
            self._streams.clear()

    def abort_all(self) -> None:
        """End every running request now: each stream gets a last event with finish_reason "abort"."""
        self._commands.put(("abort_all",))

    async def close(self) -> None:
        """Abort what is running (streams end with finish_reason "abort"), stop the worker and wait for it."""
        self._closed = True
        self.abort_all()
        self._commands.put(None)
        await asyncio.to_thread(self._worker.join, 30.0)


def _adds_text(event: TokenEvent) -> bool:
    """A sampled token that is not the stop id that ended the request (the engine gives that one no text)."""
    return event.token_id >= 0 and event.finish_reason not in ("stop", "abort", "error")


def _abort_event(request_id: str) -> TokenEvent:
    """The last event of an aborted stream: no token (id -1), no text."""
    return TokenEvent(request_id, -1, "", float("nan"), [], finish_reason="abort")
