"""The engine seam of the server: what the HTTP layer needs from an engine, and how to build one.

The server only uses `AsyncEngine`: a tokenizer, the context length, the stop ids, `stream(prompt_ids,
params)` yielding token events (closing the stream early aborts the request; `background=True`: the server's
own work, which yields to the clients' requests), `stats()` with the clients' running and waiting request
counts, and `close()`; optionally `abort_all()` (end every stream with a last event of finish_reason "abort",
no token: id -1), which the shutdown drain calls when its time is up.
`nvfp4kit.engine.async_batching.AsyncBatchingEngine` (continuous batching on a worker thread) provides it;
tests plug in scripted engines the same way. A request that fails alone in the engine raises
`RequestFailed` from its own stream only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from nvfp4kit.engine.async_batching import AsyncBatchingEngine, EngineStats
from nvfp4kit.llm import LLM, TokenEvent
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

__all__ = ["AsyncEngine", "EngineStats", "engine_for"]


class AsyncEngine(Protocol):
    tokenizer: Tokenizer
    max_model_len: int
    stop_token_ids: frozenset[int]

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, *, background: bool = False
    ) -> AsyncIterator[TokenEvent]:
        """Tokens of one request; closing the iterator early aborts the request. `background`: the server's
        own work (a history warm-up), scheduled with what the clients' requests leave."""
        ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


def engine_for(llm: LLM) -> AsyncEngine:
    """The serving engine around a loaded model: continuous batching over the model's `Engine`."""
    engine = AsyncBatchingEngine(llm.engine)
    engine.image_prompts = lambda: llm.image_prompts  # the vision tower (loaded at the first image) or None
    return engine
