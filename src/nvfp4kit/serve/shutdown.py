"""Graceful shutdown: on SIGTERM/SIGINT stop admitting, drain running requests for a bounded time, end the
rest with finish_reason "abort", then let uvicorn stop. A second signal aborts everything and stops at once;
a third does not even wait for connections to close.

uvicorn's own shutdown closes the listening socket first (so `/health` cannot answer 503) and then cuts
streams that outlive its timeout mid-body. Here uvicorn's signal handler is wrapped while the app runs: the
first signal only starts the drain, and uvicorn is told to exit when the streams have ended properly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ABORT_GRACE_S = 5.0  # after the abort, how long streams get to send their last chunks


class Drainer:
    """Counts requests in flight and runs the drain; `draining` is what `/health` and admission read."""

    def __init__(self, *, drain_timeout: float, abort_all: Callable[[], None]) -> None:
        self.drain_timeout = drain_timeout
        self.abort_all = abort_all
        self.draining = False
        self.in_flight = 0
        self._task: asyncio.Task | None = None
        self._signals: int = 0
        self._previous: dict[int, Any] = {}

    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1

    def begin(self, then: Callable[[], None] | None = None) -> asyncio.Task:
        """Start draining (idempotent); `then` runs once every request has ended."""
        self.draining = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(then))
        return self._task

    async def _drain(self, then: Callable[[], None] | None) -> None:
        await self._wait_idle(self.drain_timeout)
        if self.in_flight:
            log.warning(
                "drain time (%.0f s) is up: aborting %d running requests", self.drain_timeout, self.in_flight
            )
            self.abort_all()
            await self._wait_idle(_ABORT_GRACE_S)
        log.info("drained; stopping")
        if then is not None:
            then()

    async def _wait_idle(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def install_signal_handlers(self) -> None:
        """Wrap the handlers uvicorn installed (main thread only; in-process test servers have none)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue
            self._previous[sig] = previous
            signal.signal(
                sig, lambda signum, frame: loop.call_soon_threadsafe(self._on_signal, signum, frame)
            )

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        previous = self._previous[signum]
        if self._signals == 1:
            log.info("signal %d: draining (no new requests; /health answers 503)", signum)
            self.begin(then=lambda: previous(signum, frame))
            return
        server = getattr(previous, "__self__", None)
        if self._signals == 2:
            # End every stream now (abort + [DONE]) and let uvicorn close at once: its shutdown still runs,
            # so the engine stops cleanly and nothing is cut mid-body.
            log.warning("second signal: aborting every request and stopping now")
            with contextlib.suppress(Exception):
                self.abort_all()
        elif server is not None and hasattr(server, "force_exit"):
            server.force_exit = True  # a third: do not even wait for connections to close
        previous(signum, frame)
