"""`POST /v1/chat/completions`: render the prompt, generate n choices, parse reasoning and tool calls.

tool_choice: `none` leaves the tools out of the prompt; `auto` declares them and parses calls;
`required` and a named function prefill the start of a call in Gemma 4's own syntax
(`<|tool_call>call:` or `<|tool_call>call:NAME{`), so the model writes a call in the format it was
trained on instead of being forced into JSON.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from nvfp4kit.prompting.chat_template import ChatTemplate, ChatTemplateError, validate_tools
from nvfp4kit.prompting.prompt_tokens import RenderedPrompt, render_chat_prompt, reopen_last_turn
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.chat_output import ChatOutputParser
from nvfp4kit.serve.completions import vllm_prompt_logprobs
from nvfp4kit.serve.engine_protocol import AsyncEngine
from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.history_warmup import HistoryWarmup
from nvfp4kit.serve.metrics import ServerMetrics
from nvfp4kit.serve.protocol import ChatCompletionRequest, sampling_error
from nvfp4kit.serve.reasoning import CHANNEL_CLOSE, prompt_opens_reasoning
from nvfp4kit.serve.streaming import (
    SSE_DONE,
    chat_logprob,
    is_stop_token,
    is_token,
    new_id,
    sse,
    stream_choices,
    token_budget,
    usage,
)
from nvfp4kit.serve.structured import request_constraint, tool_call_constraint
from nvfp4kit.serve.tool_calls import TOOL_CALL_OPEN
from nvfp4kit.vision.inputs import ImageInputs
from nvfp4kit.vision.openai_parts import ImagePartError, attach_images, extract_images

ENDPOINT = "chat"


@dataclass
class PreparedChat:
    request: ChatCompletionRequest
    model: str
    prompt: str
    prompt_ids: list[int]
    prefill: str
    starts_in_reasoning: bool
    parse_tools: bool
    params: list[SamplingParams]
    arrival: float
    images: ImageInputs | None = None  # image soft tokens of the prompt (image_url content parts)
    # the messages (image parts replaced) and tools as rendered: what a warmed next turn renders again
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None

    def new_parser(self) -> ChatOutputParser:
        return ChatOutputParser(
            starts_in_reasoning=self.starts_in_reasoning,
            parse_tools=self.parse_tools,
            max_calls=None if self.request.parallel_tool_calls else 1,
        )


class ChatHandler:
    def __init__(
        self,
        engine: AsyncEngine,
        template: ChatTemplate,
        metrics: ServerMetrics,
        *,
        warmup: HistoryWarmup | None = None,
    ) -> None:
        self.engine = engine
        self.template = template
        self.metrics = metrics
        self.warmup = warmup  # prefills a finished chat's history for its next turn (serve/history_warmup.py)

    def prepare(self, request: ChatCompletionRequest, *, model: str) -> PreparedChat:
        """Validate and render; raises APIError (4xx) for anything the client must fix."""
        arrival = time.perf_counter()
        request.check()
        request.check_token_ids(self.engine.tokenizer.vocab_size)
        choice = request.tool_choice
        tools = request.tools
        try:
            if tools:
                validate_tools(tools)
            if choice not in (None, "none", "auto", "required"):
                names = [t["function"]["name"] for t in tools or ()]
                if choice.function.name not in names:
                    raise APIError(
                        f"tool_choice names {choice.function.name!r}, which is not in tools ({', '.join(names)})",
                        param="tool_choice",
                    )
            messages = [{k: v for k, v in m.model_dump().items() if v is not None} for m in request.messages]
            messages, images = extract_images(messages)  # image parts -> {"type": "image"} + their bytes
            prompt_tools = tools if tools and choice != "none" else None
            rendered = render_chat_prompt(
                self.template,
                self.engine.tokenizer,
                messages,
                tools=prompt_tools,
                add_generation_prompt=request.add_generation_prompt,
                template_kwargs=request.template_kwargs(),
            )
        except ImagePartError as exc:
            raise APIError(str(exc), param=exc.param) from exc
        except ChatTemplateError as exc:
            raise APIError(str(exc), param="tools" if str(exc).startswith("tools") else "messages") from exc
        prompt, prompt_ids = rendered.text, rendered.ids
        image_inputs = None
        if images:
            try:
                prompt_ids, image_inputs = attach_images(self.engine, prompt_ids, images)
            except ImagePartError as exc:
                raise APIError(str(exc), param=exc.param) from exc
        if request.continue_final_message:
            prompt, prompt_ids = self._reopen_last_turn(prompt, prompt_ids)
        prefill = ""
        if choice == "required":
            prefill = TOOL_CALL_OPEN + "call:"
        elif choice not in (None, "none", "auto"):
            prefill = TOOL_CALL_OPEN + "call:" + choice.function.name + "{"
        suffix = prefill
        if prefill and prompt_opens_reasoning(prompt):
            suffix = CHANNEL_CLOSE + prefill  # a forced call skips the reasoning the prompt had opened
        if suffix:  # server markup (starts with a control token), so it tokenizes apart from the prompt
            prompt += suffix
            prompt_ids = prompt_ids + self.engine.tokenizer.encode(suffix, add_bos=False)
        prompt, prompt_ids = self._vllm_prompt_fields(request, prompt, prompt_ids, has_images=bool(images))
        max_tokens = token_budget(len(prompt_ids), request.requested_max_tokens(), self.engine.max_model_len)
        thought_end = (
            self.engine.tokenizer.token_to_id(CHANNEL_CLOSE) if prompt_opens_reasoning(prompt) else None
        )
        # structured output constrains the answer, not the thought before it
        constraint = request_constraint(self.engine, request, start_after=thought_end)
        if constraint is not None and prefill:
            raise APIError(
                "a forced tool call and a structured output cannot be combined", param="tool_choice"
            )
        if prefill:  # the forced call's name and arguments follow the tools' schemas
            named = None if choice == "required" else choice.function.name
            parallel = request.parallel_tool_calls and named is None
            constraint = tool_call_constraint(self.engine, tools, name=named, parallel=parallel)
        engine_fields = request.engine_fields(self.engine.tokenizer)  # bad words tokenized once
        try:
            params = [
                request.sampling_params(
                    max_tokens=max_tokens,
                    top_logprobs=request.top_logprob_count(),
                    choice=i,
                    prompt_logprobs=request.prompt_logprobs,
                    constraint=constraint,
                    engine_fields=engine_fields,
                )
                for i in range(request.n)
            ]
        except ValueError as exc:
            raise sampling_error(exc) from exc
        # the reasoning and tool-call parsers read the control tokens, so chat always detokenizes with them
        params = [replace(p, skip_special_tokens=False) for p in params]
        return PreparedChat(
            request=request,
            model=model,
            prompt=prompt,
            prompt_ids=prompt_ids,
            prefill=prefill,
            starts_in_reasoning=prompt_opens_reasoning(prompt),
            parse_tools=bool(tools) and choice != "none",
            params=params,
            arrival=arrival,
            images=image_inputs,
            messages=messages,
            tools=prompt_tools,
        )

    def _vllm_prompt_fields(
        self, request: ChatCompletionRequest, prompt: str, ids: list[int], *, has_images: bool
    ) -> tuple[str, list[int]]:
        """`add_special_tokens` (default false: the template wrote the <bos>; true adds one more, as vLLM's
        tokenizer would) and `truncate_prompt_tokens` (the last k tokens of the rendered prompt)."""
        bos = self.engine.tokenizer.bos_id
        if request.add_special_tokens and bos is not None:
            prompt, ids = self.engine.tokenizer.bos_token + prompt, [bos, *ids]
        kept = request.truncated(ids, self.engine.max_model_len, has_images=has_images)
        if len(kept) < len(ids):
            prompt, ids = self.engine.tokenizer.decode(kept), kept
        return prompt, ids

    def _reopen_last_turn(self, prompt: str, prompt_ids: list[int]) -> tuple[str, list[int]]:
        """The prompt without the end of its last (assistant) turn, so the model continues that message."""
        try:
            reopened = reopen_last_turn(self.engine.tokenizer, RenderedPrompt(prompt, prompt_ids))
        except ChatTemplateError as exc:
            raise APIError(str(exc), param="continue_final_message") from exc
        return reopened.text, reopened.ids

    def _visible(self, chat: PreparedChat, fields: dict[str, Any]) -> dict[str, Any]:
        """With skip_special_tokens, control-token text left in the content or reasoning is dropped (the
        parsers have already consumed Gemma's thinking and tool-call markers)."""
        if not chat.request.skip_special_tokens:
            return fields
        pattern = self.engine.tokenizer.special_token_pattern
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(fields.get(key), str):
                fields[key] = pattern.sub("", fields[key])
        return fields

    def _events(self, chat: PreparedChat) -> AsyncIterator:
        self.metrics.add_prompt_tokens(len(chat.prompt_ids))
        return stream_choices(
            self.engine, self.metrics, chat.prompt_ids, chat.params, arrival=chat.arrival, images=chat.images
        )

    async def complete(self, chat: PreparedChat) -> dict[str, Any]:
        """The whole response as one `chat.completion` object."""
        n = chat.request.n
        parsers = [chat.new_parser() for _ in range(n)]
        for parser in parsers:
            parser.feed(chat.prefill)
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        token_ids: list[list[int]] = [[] for _ in range(n)]
        as_id = chat.request.return_tokens_as_token_ids
        finish = ["length"] * n
        generated = 0
        cached = None
        prompt_entries: list = []
        async with contextlib.aclosing(self._events(chat)) as events:
            async for index, event in events:
                generated += is_token(event)
                if index == 0 and getattr(event, "cached_tokens", None) is not None:
                    cached = event.cached_tokens
                prompt_entries = getattr(event, "prompt_logprobs", None) or prompt_entries
                if is_token(event):
                    token_ids[index].append(event.token_id)
                parsers[index].feed(event.text)
                if (
                    chat.request.logprobs
                    and is_token(event)
                    and not is_stop_token(self.engine, event, chat.params[index])
                ):
                    logprobs[index].append(chat_logprob(self.engine, event, as_id=as_id))
                if event.finish_reason:
                    finish[index] = event.finish_reason
        choices = []
        for index, parser in enumerate(parsers):
            parser.finish()
            choices.append(
                {
                    "index": index,
                    "message": self._visible(chat, parser.message()),
                    "logprobs": {"content": logprobs[index]} if chat.request.logprobs else None,
                    "finish_reason": _finish_reason(finish[index], parser),
                    **({"token_ids": token_ids[index]} if chat.request.return_token_ids else {}),
                }
            )
        response = {
            "id": chat.request.response_id("chatcmpl", new_id("chatcmpl")),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": choices,
            "usage": usage(len(chat.prompt_ids), generated, cached),
        }
        self.metrics.add_cached_tokens(cached or 0)
        if self.warmup is not None:
            self.warmup.after_reply(chat, choices[0]["message"], finish[0])
        if chat.request.prompt_logprobs is not None:
            response["prompt_logprobs"] = vllm_prompt_logprobs(self.engine, prompt_entries)
        if chat.request.return_token_ids:
            response["prompt_token_ids"] = chat.prompt_ids
        return response

    async def stream(self, chat: PreparedChat) -> AsyncIterator[str]:
        """Server-sent events: role chunk, delta chunks, a finish chunk per choice, usage, [DONE]."""
        request = chat.request
        response_id, created = request.response_id("chatcmpl", new_id("chatcmpl")), int(time.time())
        usage_field = {"usage": None} if request.include_usage else {}
        # return_token_ids: the first chunk carries the prompt's ids, each choice's chunks the ids since its last
        pending: list[list[int]] | None = [[] for _ in range(request.n)] if request.return_token_ids else None
        as_id = request.return_tokens_as_token_ids

        def chunk(index: int, delta: dict[str, Any], *, finish: str | None = None, logprobs=None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [choice],
                **usage_field,
            }
            if pending is not None:
                choice["token_ids"], pending[index] = pending[index], []
                if index == 0 and delta.get("role"):
                    body["prompt_token_ids"] = chat.prompt_ids
            return sse(body)

        parsers = [chat.new_parser() for _ in range(request.n)]
        for index, parser in enumerate(parsers):
            yield chunk(index, {"role": "assistant", "content": ""})
            first = parser.feed(chat.prefill)
            if not first.is_empty():
                yield chunk(index, self._visible(chat, first.as_openai_delta()))
        generated = 0
        cached = None
        finish = None
        async with contextlib.aclosing(self._events(chat)) as events:
            async for index, event in events:
                generated += is_token(event)
                if index == 0 and getattr(event, "cached_tokens", None) is not None:
                    cached = event.cached_tokens
                finish = event.finish_reason or finish
                if pending is not None and is_token(event):
                    pending[index].append(event.token_id)
                parser = parsers[index]
                delta = parser.feed(event.text)
                if event.finish_reason:
                    delta.extend(parser.finish())
                logprobs = None
                if (
                    request.logprobs
                    and is_token(event)
                    and not is_stop_token(self.engine, event, chat.params[index])
                ):
                    logprobs = {"content": [chat_logprob(self.engine, event, as_id=as_id)]}
                if not delta.is_empty() or logprobs:
                    yield chunk(index, self._visible(chat, delta.as_openai_delta()), logprobs=logprobs)
                if event.finish_reason:
                    yield chunk(index, {}, finish=_finish_reason(event.finish_reason, parser))
        self.metrics.add_cached_tokens(cached or 0)
        if self.warmup is not None and finish is not None:
            self.warmup.after_reply(chat, self._visible(chat, parsers[0].message()), finish)
        if request.include_usage:
            yield sse(
                {
                    "id": response_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": chat.model,
                    "choices": [],
                    "usage": usage(len(chat.prompt_ids), generated, cached),
                }
            )
        yield SSE_DONE


def _finish_reason(engine_reason: str, parser: ChatOutputParser) -> str:
    if engine_reason == "stop" and parser.has_tool_calls:
        return "tool_calls"
    return engine_reason
