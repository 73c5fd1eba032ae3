"""The engine seam of the server: an async token stream per request.

The server only needs `AsyncEngine`: a tokenizer, the context length, the stop ids, `stream(prompt_ids,
params)` yielding `TokenEvent`s, counts of running and waiting requests, and `close()`. `ThreadedLLMEngine`
provides it over the one-request-at-a-time `LLM`: requests queue up and a single worker thread runs them
in turn, handing each token to the request's asyncio queue. The continuous-batching engine replaces this
file's class and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from nvfp4kit.generate import LLM, TokenEvent
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int


class AsyncEngine(Protocol):
    tokenizer: Tokenizer
    max_model_len: int
    stop_token_ids: frozenset[int]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Tokens of one request; closing the iterator early aborts the request."""
        ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


_DONE = object()


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def push(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


class ThreadedLLMEngine:
    """Runs `LLM.stream` for one request at a time on a worker thread; requests wait in arrival order."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        eos = llm.generation_config.get("eos_token_id", llm.config.eos_token_ids)
        self.stop_token_ids = frozenset([eos] if isinstance(eos, int) else eos) | frozenset(
            llm.config.eos_token_ids
        )
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="nvfp4kit-engine", daemon=True)
        self._worker.start()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(self._running, self._waiting)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        job = _Job(list(prompt_ids), params, asyncio.get_running_loop())
        with self._lock:
            self._waiting += 1
        self._jobs.put(job)
        try:
            while True:
                item = await job.tokens.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # stops the worker on this request if it is still running

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                if not job.cancelled.is_set():
                    with contextlib.closing(self.llm.stream(job.prompt_ids, job.params)) as events:
                        for event in events:
                            job.push(event)
                            if job.cancelled.is_set():
                                break  # closing the generator frees the request's cache
            except Exception as exc:  # reported to the request that caused it; the worker keeps serving
                log.exception("generation failed")
                job.push(exc)
            finally:
                with self._lock:
                    self._running -= 1
                job.push(_DONE)

    async def close(self) -> None:
        """Stop taking requests, cancel queued ones, and wait for the worker to finish the current token."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                with self._lock:
                    self._waiting -= 1
                job.push(RuntimeError("the server is shutting down"))
                job.push(_DONE)
        self._jobs.put(None)
        await asyncio.to_thread(self._worker.join, 30.0)
