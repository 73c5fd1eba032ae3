"""`POST /v1/completions`: raw text continuation of one or more prompts (text or token ids), n choices each.

Choice indices run prompt by prompt: prompt p, sample j has index p * n + j, as in OpenAI's API.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nvfp4kit.llm import TokenEvent
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.engine_protocol import AsyncEngine
from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.metrics import ServerMetrics
from nvfp4kit.serve.protocol import CompletionRequest, sampling_error
from nvfp4kit.serve.request_fields import logprob_token
from nvfp4kit.serve.streaming import (
    SSE_DONE,
    finite,
    is_stop_token,
    is_token,
    new_id,
    sse,
    stream_jobs,
    token_budget,
    token_text,
    usage,
)
from nvfp4kit.serve.structured import request_constraint

ENDPOINT = "completions"


@dataclass
class PreparedPrompt:
    text: str
    ids: list[int]
    params: list[SamplingParams]


@dataclass
class PreparedCompletion:
    request: CompletionRequest
    model: str
    prompts: list[PreparedPrompt]
    arrival: float


class _Logprobs:
    """The legacy completions logprobs object, built token by token."""

    def __init__(self, *, as_ids: bool = False) -> None:
        self._as_ids = as_ids  # return_tokens_as_token_ids: tokens named "token_id:N"
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def _name(self, engine: AsyncEngine, token_id: int) -> str:
        return logprob_token(engine.tokenizer, token_id, as_id=self._as_ids)

    def add(self, engine: AsyncEngine, event: TokenEvent, offset: int) -> None:
        self.tokens.append(self._name(engine, event.token_id))
        self.token_logprobs.append(finite(event.logprob))
        self.top_logprobs.append({self._name(engine, t): finite(lp) for t, lp in event.top_logprobs})
        self.text_offset.append(offset)

    def add_prompt(
        self, engine: AsyncEngine, prompt: PreparedPrompt, entries: list, echo_length: int
    ) -> None:
        """The prompt's tokens first (echo): the first has no logprob; offsets end where the echo text does."""
        texts = [engine.tokenizer.decode([t]) for t in prompt.ids]
        shift = sum(map(len, texts)) - echo_length  # e.g. a "<bos>" the echoed text does not show
        offset = 0
        for token, text, entry in zip(prompt.ids, texts, entries):
            self.tokens.append(self._name(engine, token))
            self.token_logprobs.append(None if entry is None else finite(entry.logprob))
            self.top_logprobs.append(
                None if entry is None else {self._name(engine, t): finite(lp) for t, lp in entry.top}
            )
            self.text_offset.append(max(0, offset - shift))
            offset += len(text)

    def extend(self, other: _Logprobs) -> None:
        for name, values in self.as_dict().items():
            values.extend(getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def vllm_prompt_logprobs(engine: AsyncEngine, entries: list) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None or {id: {logprob, rank, decoded_token}} for the token
    itself and the top alternatives."""
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked = {entry.token_id: (entry.logprob, entry.rank)}
        for rank, (token, logprob) in enumerate(entry.top, start=1):
            ranked.setdefault(token, (logprob, rank))
        out.append(
            {
                str(token): {"logprob": finite(lp), "rank": rank, "decoded_token": token_text(engine, token)}
                for token, (lp, rank) in ranked.items()
            }
        )
    return out


class CompletionHandler:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def prepare(self, request: CompletionRequest, *, model: str) -> PreparedCompletion:
        arrival = time.perf_counter()
        request.check()
        request.check_token_ids(self.engine.tokenizer.vocab_size)
        constraint = request_constraint(self.engine, request)
        engine_fields = request.engine_fields(self.engine.tokenizer)
        add_bos = request.add_special_tokens is not False  # vLLM's default for completions: true
        prompts = []
        vocab = self.engine.tokenizer.vocab_size
        for p, prompt in enumerate(request.prompts()):
            if isinstance(prompt, str):
                if not prompt:
                    raise APIError(f"prompt {p} is empty", param="prompt")
                ids, text = self.engine.tokenizer.encode(prompt, add_bos=add_bos), prompt
            else:
                if not prompt:
                    raise APIError(f"prompt {p} is an empty token list", param="prompt")
                bad = [t for t in prompt if not 0 <= t < vocab]
                if bad:
                    raise APIError(
                        f"prompt {p} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                        param="prompt",
                    )
                ids, text = list(prompt), self.engine.tokenizer.decode(prompt)
            kept = request.truncated(ids, self.engine.max_model_len)
            if len(kept) < len(ids):  # echo shows the prompt the model saw
                ids, text = kept, self.engine.tokenizer.decode(kept)
            max_tokens = token_budget(
                len(ids), request.max_tokens, self.engine.max_model_len, prompt_param="prompt"
            )
            try:
                params = [
                    request.sampling_params(
                        max_tokens=max_tokens,
                        top_logprobs=request.logprobs,
                        choice=j,
                        prompt_logprobs=request.prompt_logprob_count(),
                        constraint=constraint,
                        engine_fields=engine_fields,
                    )
                    for j in range(request.n)
                ]
            except ValueError as exc:
                raise sampling_error(exc) from exc
            prompts.append(PreparedPrompt(text, ids, params))
        return PreparedCompletion(request, model, prompts, arrival)

    async def _events(self, job: PreparedCompletion) -> AsyncIterator[tuple[int, TokenEvent, SamplingParams]]:
        """(choice index, token, its params) over all prompts; every prompt's choices go to the engine at once
        (choice p * n + j is prompt p's sample j), so a list of prompts is batched like separate requests."""
        jobs = [(prompt.ids, params) for prompt in job.prompts for params in prompt.params]
        self.metrics.add_prompt_tokens(sum(len(prompt.ids) for prompt in job.prompts))
        events = stream_jobs(self.engine, self.metrics, jobs, arrival=job.arrival)
        async with contextlib.aclosing(events) as tokens:
            async for index, event in tokens:
                yield index, event, jobs[index][1]

    def _echoed(
        self, job: PreparedCompletion, index: int, entries: list | None, generated: _Logprobs
    ) -> _Logprobs:
        """The logprobs object of a choice: with echo, the prompt's tokens come first."""
        if not (job.request.echo and entries):
            return generated
        prompt = self._prompt_of(job, index)
        combined = _Logprobs(as_ids=job.request.return_tokens_as_token_ids)
        combined.add_prompt(self.engine, prompt, entries, len(prompt.text))
        combined.extend(generated)
        return combined

    def _reports_logprob(self, job: PreparedCompletion, event: TokenEvent, params: SamplingParams) -> bool:
        return (
            job.request.logprobs is not None
            and is_token(event)
            and not is_stop_token(self.engine, event, params)
        )

    def _prompt_of(self, job: PreparedCompletion, index: int) -> PreparedPrompt:
        return job.prompts[index // job.request.n]

    async def complete(self, job: PreparedCompletion) -> dict[str, Any]:
        count = len(job.prompts) * job.request.n
        texts = [self._prompt_of(job, i).text if job.request.echo else "" for i in range(count)]
        as_ids = job.request.return_tokens_as_token_ids
        logprobs = [_Logprobs(as_ids=as_ids) for _ in range(count)]
        token_ids: list[list[int]] = [[] for _ in range(count)]
        prompt_entries: list[list | None] = [None] * count
        finish = ["length"] * count
        generated = 0
        cached: dict[int, int] = {}
        async with contextlib.aclosing(self._events(job)) as events:
            async for index, event, params in events:
                generated += is_token(event)
                _note_cached(cached, job, index, event)
                if is_token(event):
                    token_ids[index].append(event.token_id)
                if event.prompt_logprobs is not None:
                    prompt_entries[index] = event.prompt_logprobs
                if self._reports_logprob(job, event, params):
                    logprobs[index].add(self.engine, event, len(texts[index]))
                texts[index] += event.text
                if event.finish_reason:
                    finish[index] = event.finish_reason
        self.metrics.add_cached_tokens(sum(cached.values()))
        choices = []
        for i in range(count):
            choice: dict[str, Any] = {
                "index": i,
                "text": texts[i],
                "logprobs": None,
                "finish_reason": finish[i],
            }
            if job.request.logprobs is not None:
                choice["logprobs"] = self._echoed(job, i, prompt_entries[i], logprobs[i]).as_dict()
            if job.request.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(self.engine, prompt_entries[i] or [])
            if job.request.return_token_ids:
                choice["prompt_token_ids"] = self._prompt_of(job, i).ids
                choice["token_ids"] = token_ids[i]
            choices.append(choice)
        return {
            "id": job.request.response_id("cmpl", new_id("cmpl")),
            "object": "text_completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": choices,
            "usage": _usage(job, generated, cached),
        }

    async def stream(self, job: PreparedCompletion) -> AsyncIterator[str]:
        response_id, created = job.request.response_id("cmpl", new_id("cmpl")), int(time.time())
        usage_field = {"usage": None} if job.request.include_usage else {}
        count = len(job.prompts) * job.request.n
        # return_token_ids: each choice's first chunk carries its prompt's ids, every chunk the ids since the last
        pending: list[list[int]] | None = [[] for _ in range(count)] if job.request.return_token_ids else None
        prompt_sent = [False] * count

        def chunk(index: int, text: str, *, finish: str | None = None, logprobs=None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if pending is not None:
                if not prompt_sent[index]:
                    choice["prompt_token_ids"], prompt_sent[index] = self._prompt_of(job, index).ids, True
                choice["token_ids"], pending[index] = pending[index], []
            return sse(
                {
                    "id": response_id,
                    "object": "text_completion",
                    "created": created,
                    "model": job.model,
                    "choices": [choice],
                    **usage_field,
                }
            )

        offsets = [0] * count
        as_ids = job.request.return_tokens_as_token_ids
        echo_waits = job.request.echo and job.request.logprobs is not None  # for the prompt's logprobs
        if job.request.echo:
            for i in range(len(offsets)):
                offsets[i] = len(self._prompt_of(job, i).text)
                if not echo_waits:
                    yield chunk(i, self._prompt_of(job, i).text)
        generated = 0
        cached: dict[int, int] = {}
        async with contextlib.aclosing(self._events(job)) as events:
            async for index, event, params in events:
                generated += is_token(event)
                _note_cached(cached, job, index, event)
                if pending is not None and is_token(event):
                    pending[index].append(event.token_id)
                if echo_waits and event.prompt_logprobs is not None:
                    echoed = self._echoed(job, index, event.prompt_logprobs, _Logprobs(as_ids=as_ids))
                    yield chunk(index, self._prompt_of(job, index).text, logprobs=echoed.as_dict())
                logprobs = None
                if self._reports_logprob(job, event, params):
                    entry = _Logprobs(as_ids=as_ids)
                    entry.add(self.engine, event, offsets[index])
                    logprobs = entry.as_dict()
                offsets[index] += len(event.text)
                if (
                    event.text
                    or logprobs
                    or (pending is not None and not event.finish_reason and is_token(event))
                ):
                    yield chunk(index, event.text, logprobs=logprobs)
                if event.finish_reason:
                    yield chunk(index, "", finish=event.finish_reason)
        self.metrics.add_cached_tokens(sum(cached.values()))
        if job.request.include_usage:
            yield sse(
                {
                    "id": response_id,
                    "object": "text_completion",
                    "created": created,
                    "model": job.model,
                    "choices": [],
                    "usage": _usage(job, generated, cached),
                }
            )
        yield SSE_DONE


def _note_cached(cached: dict[int, int], job: PreparedCompletion, index: int, event) -> None:
    """Cached prompt tokens, once per prompt (its first choice), from the event that carries them."""
    if index % job.request.n == 0 and getattr(event, "cached_tokens", None) is not None:
        cached[index] = event.cached_tokens


def _usage(job: PreparedCompletion, generated: int, cached: dict[int, int]) -> dict:
    """The usage object (prompt tokens counted once per prompt, not per choice)."""
    prompt_tokens = sum(len(p.ids) for p in job.prompts)
    return usage(prompt_tokens, generated, sum(cached.values()) if cached else None)
