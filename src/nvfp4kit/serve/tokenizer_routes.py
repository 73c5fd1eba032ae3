"""vLLM's helper routes: `/tokenize`, `/detokenize`, `/tokenizer_info`, `/version`, `GET /v1/models/{id}`.

lm-eval and other vLLM clients look the tokenizer up through these instead of downloading it. Tokenizing
runs on the server's worker pool, like every other prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import nvfp4kit
from nvfp4kit.prompting.chat_template import ChatTemplate, ChatTemplateError
from nvfp4kit.prompting.prompt_tokens import render_chat_prompt
from nvfp4kit.serve.engine_protocol import AsyncEngine
from nvfp4kit.serve.errors import APIError, from_validation_error
from nvfp4kit.serve.protocol import MAX_MESSAGES, ChatMessage


class TokenizeRequest(BaseModel):
    """vLLM's two forms: a raw `prompt`, or chat `messages` rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # raw prompts: prepend <bos>
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def model_card(name: str, *, root: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "nvfp4kit",
        "root": root,
        "max_model_len": max_model_len,
    }


def add_tokenizer_routes(
    app: FastAPI,
    *,
    engine: AsyncEngine,
    template: ChatTemplate,
    model_names: Sequence[str],
    created: int,
    refused: Callable[[Request], Response | None],
    read_body: Callable[[Request], Any],
    executor: Executor,
) -> None:
    tokenizer = engine.tokenizer

    async def parsed(request: Request, schema: type[BaseModel]) -> BaseModel:
        body = schema.model_validate(await read_body(request))
        name = getattr(body, "model", None)
        if name is not None and name not in model_names:
            raise APIError(
                f"model {name!r} does not exist", status=404, param="model", code="model_not_found"
            )
        return body

    async def answer(request: Request, schema: type[BaseModel], work: Callable[[Any], dict]) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        try:
            body = await parsed(request, schema)
            result = await asyncio.get_running_loop().run_in_executor(executor, work, body)
        except ValidationError as exc:
            error = from_validation_error(exc)
            return JSONResponse(error.body(), status_code=error.status)
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return JSONResponse(result)

    def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise APIError("send either prompt or messages", param="prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
        else:
            messages = [{k: v for k, v in m.model_dump().items() if v is not None} for m in body.messages]
            try:
                ids = render_chat_prompt(
                    template,
                    tokenizer,
                    messages,
                    tools=body.tools,
                    add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                    template_kwargs=body.chat_template_kwargs or {},
                ).ids
            except ChatTemplateError as exc:
                raise APIError(str(exc), param="messages") from exc
        result: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = [tokenizer.id_to_token(t) for t in ids]
        return result

    def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(
                f"token ids outside the vocabulary [0, {tokenizer.vocab_size}): {bad[:5]}", param="tokens"
            )
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await answer(request, TokenizeRequest, tokenize)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await answer(request, DetokenizeRequest, detokenize)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        specials = tokenizer.special_tokens
        return JSONResponse(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "vocab_size": tokenizer.vocab_size,
                "model_max_length": engine.max_model_len,
                "bos_token": tokenizer.bos_token,
                "eos_token": next((t for t, i in specials.items() if i in engine.stop_token_ids), None),
                "pad_token": "<pad>" if "<pad>" in specials else None,
                "chat_template": template.source,
            }
        )

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": nvfp4kit.__version__})

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        if name not in model_names:
            error = APIError(
                f"model {name!r} does not exist", status=404, param="model", code="model_not_found"
            )
            return JSONResponse(error.body(), status_code=404)
        card = model_card(name, root=model_names[0], created=created, max_model_len=engine.max_model_len)
        return JSONResponse(card)
