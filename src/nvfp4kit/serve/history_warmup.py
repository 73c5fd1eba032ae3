"""Warm a chat's next turn: once a reply is out, prefill the conversation as the next request will send it.

Chat clients send the whole history with every turn, the last reply included. The KV computed while the reply
was generated does not serve that turn: Gemma 4's template renders a finished model turn without the thought
channel the generation prompt opened (`<|turn>model\\n<|channel>thought\\n<channel|>` when thinking is off), so
the next prompt parts from this one right after `<|turn>model\\n` and would prefill the whole reply again. So the
server renders the messages plus the reply as history (no generation prompt, the reply as the client gets it)
and runs that as a one-token request while the client reads the answer: the prefix cache keeps its KV for the
next turn, and a next turn that arrives while it still runs waits for it and shares it (`PrefixCache.twin`).
That shortens the next turn's time to first token by the reply's prefill when the user answers later than the
warm-up takes (people do); a client that answers at once gains nothing (it prefills the reply itself, or waits
for the warm-up's prefill).

It costs a prefill of about the reply's length per turn, so it only runs for conversations that already have a
model turn (a one-shot request would pay it for nothing), when no client's request waits and the clients' running
requests plus the warm-ups in flight are at most `MAX_RUNNING` (under load it would take throughput from them),
for one choice (n = 1) that ended by a stop or the token budget without a tool call, and for prompts rendered the
plain way (no images, forced tool call, truncation, reopened last turn or extra BOS).

It yields to the clients' requests in the engine: it is a background request (`stream(..., background=True)`,
`engine/scheduler.py`), which takes a prefill chunk only in a step that computes no client's prompt (beside their
decodes, with the budget they leave), is admitted only while no client's request waits for room, is preempted
first when the KV runs short, and becomes a client's request when the next turn arrives and waits for it. A step
cannot be interrupted, though: a request that arrives while a warm-up's step runs waits for that step. So the
warm-up starts `START_DELAY` after the reply (checking the load again), when a client that sends its next request
at once (a new conversation, a follow-up call) is served already.

Opt-in (`serve --warm-history`). On the CPU demo (`bench serve --turns 4 --input-len 256 --output-len 96
--think-time 2`, `--concurrency 1 --num-prompts 3` and `--concurrency 2 --num-prompts 6`, two runs each, with and
without `--serve-args=--warm-history`), TTFT by turn: at concurrency 1, 140 / 214 / 173 / 172 ms against 147 / 220
/ 215 / 224 without (cached tokens 0 / 256 / 773 / 1,168 against 0 / 256 / 656 / 1,040); at concurrency 2, 229 /
286 / 233 / 256 against 218 / 294 / 284 / 298. The first turn of a new conversation no longer pays for the previous
one's warm-up: at concurrency 1 it took 244 ms when warm-ups were ordinary requests, and 222 ms as background
requests started at once (they met the warm-up's step under way). The cost left: the client's decode step that a
warm-up chunk joins is longer (ITL p99 89 against 57 ms at concurrency 1; the scheduler keeps such a step within
`background_step_tokens`, 256, above the demo's ~100-token chunks but well below a GPU's 8K-token budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nvfp4kit.prompting.chat_template import ChatTemplate
from nvfp4kit.prompting.prompt_tokens import render_chat_prompt
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.engine_protocol import AsyncEngine

if TYPE_CHECKING:
    from nvfp4kit.serve.chat import PreparedChat

log = logging.getLogger(__name__)

# clients' requests running plus warm-ups in flight the engine may have for a warm-up to start
MAX_RUNNING = 4
# seconds between a reply and its warm-up: a client's next request often follows its reply at once (a new
# conversation, a follow-up call), and one that finds a warm-up's step under way waits for it
START_DELAY = 0.25


class HistoryWarmup:
    def __init__(
        self, engine: AsyncEngine, template: ChatTemplate, render_in: Callable | None = None
    ) -> None:
        """`render_in(fn)`: an awaitable running fn off the event loop (default: a thread of asyncio's)."""
        self.engine, self.template = engine, template
        self.render_in = render_in or asyncio.to_thread
        self.tasks: set[asyncio.Task] = set()  # kept referenced until done

    def after_reply(self, chat: PreparedChat, message: dict[str, Any], finish_reason: str) -> None:
        """Called with the reply's `message` (as the client gets it) when a chat completion has finished."""
        if not _eligible(chat, message, finish_reason) or self._busy():
            return
        task = asyncio.get_running_loop().create_task(self._run(chat, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _busy(self) -> bool:
        """Clients' requests wait, or too many requests run (a warm-up would take their throughput)."""
        stats = self.engine.stats()
        return bool(stats.waiting) or stats.running + stats.background > MAX_RUNNING

    async def _run(self, chat: PreparedChat, message: dict[str, Any]) -> None:
        try:
            await asyncio.sleep(START_DELAY)
            if self._busy():
                return
            ids = await self.render_in(lambda: self._history_ids(chat, message))
            if len(ids) >= self.engine.max_model_len:
                return
            params = SamplingParams(
                max_tokens=1, temperature=0, detokenize=False, cache_salt=chat.params[0].cache_salt
            )
            async with contextlib.aclosing(self.engine.stream(ids, params, background=True)) as events:
                async for _ in events:
                    pass
        except Exception:  # an optimisation only: it never fails a client's request
            log.debug("warming a chat's next turn failed", exc_info=True)

    def _history_ids(self, chat: PreparedChat, message: dict[str, Any]) -> list[int]:
        history = [*chat.messages, {"role": "assistant", "content": message.get("content") or ""}]
        rendered = render_chat_prompt(
            self.template,
            self.engine.tokenizer,
            history,
            tools=chat.tools,
            add_generation_prompt=False,
            template_kwargs=chat.request.template_kwargs(),
        )
        return rendered.ids


def _eligible(chat: PreparedChat, message: dict[str, Any], finish_reason: str) -> bool:
    request = chat.request
    plain = (
        request.n == 1
        and any(m.role == "assistant" for m in request.messages)
        and request.add_generation_prompt
        and not request.continue_final_message
        and not request.add_special_tokens
        and request.truncate_prompt_tokens is None
        and request.prompt_logprobs is None
    )
    return (
        plain
        and chat.images is None
        and chat.messages is not None
        and not chat.prefill
        and finish_reason in ("stop", "length")
        and not message.get("tool_calls")
        and isinstance(message.get("content"), str)
    )
