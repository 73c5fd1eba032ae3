"""The FastAPI application: OpenAI-compatible routes, API-key check, errors in OpenAI's shape, metrics.

Every client mistake gets a 4xx with a message that says what to fix, and the server keeps serving;
a client that disconnects aborts its request; shutdown (SIGTERM via uvicorn) lets running requests end
and then stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvfp4kit.serve.async_engine import AsyncEngine
from nvfp4kit.serve.chat import ChatHandler
from nvfp4kit.serve.chat_template import ChatTemplate
from nvfp4kit.serve.completions import CompletionHandler
from nvfp4kit.serve.errors import APIError, from_validation_error
from nvfp4kit.serve.metrics import ServerMetrics
from nvfp4kit.serve.protocol import ChatCompletionRequest, CompletionRequest
from nvfp4kit.serve.streaming import SSE_DONE, sse

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.25


class _ClientGone(Exception):
    pass


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON ({exc}); send a JSON object") from exc
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`, cancelling it if the client disconnects first (non-streamed requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def create_app(
    engine: AsyncEngine,
    *,
    template: ChatTemplate,
    model_names: Sequence[str],
    api_key: str | None = None,
) -> FastAPI:
    """The server application around `engine`; `model_names[0]` is the main name, the rest aliases."""
    if not model_names:
        raise ValueError("model_names must name the served model at least once")
    metrics = ServerMetrics(engine.stats)
    chat = ChatHandler(engine, template, metrics)
    completions = CompletionHandler(engine, metrics)
    started = int(time.time())
    state = {"shutting_down": False}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state["shutting_down"] = True
        await engine.close()

    app = FastAPI(title="nvfp4kit", lifespan=lifespan)
    app.state.metrics = metrics

    def refused(request: Request) -> JSONResponse | None:
        """The 401 for a request without the right key (checked in the routes: an HTTP middleware would
        hide client disconnects from the handlers)."""
        if not api_key:
            return None
        sent = request.headers.get("authorization", "")
        if secrets.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            return None
        return _error_response(
            APIError(
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    def resolve_model(name: str) -> str:
        if name not in model_names:
            raise APIError(
                f"model {name!r} does not exist; this server serves {', '.join(map(repr, model_names))}",
                status=404,
                param="model",
                code="model_not_found",
            )
        return name

    async def guarded(chunks: AsyncIterator[str], endpoint: str) -> AsyncIterator[str]:
        outcome = "aborted"  # stays so if the client goes away mid-stream
        try:
            async with contextlib.aclosing(chunks) as events:
                async for text in events:
                    yield text
            outcome = "ok"
        except APIError as exc:
            outcome = "error"
            yield sse(exc.body())
            yield SSE_DONE
        except Exception as exc:
            outcome = "error"
            log.exception("streamed request failed")
            yield sse(APIError(f"internal error: {exc}", status=500, type="server_error").body())
            yield SSE_DONE
        finally:
            metrics.request_done(endpoint, outcome)

    async def serve(request: Request, schema: type[BaseModel], handler: Any, endpoint: str) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        if state["shutting_down"]:
            return _error_response(APIError("the server is shutting down", status=503, type="server_error"))
        try:
            parsed = schema.model_validate(await _json_body(request))
            prepared = handler.prepare(parsed, model=resolve_model(parsed.model))
        except ValidationError as exc:
            metrics.request_done(endpoint, "rejected")
            return _error_response(from_validation_error(exc))
        except APIError as exc:
            metrics.request_done(endpoint, "rejected")
            return _error_response(exc)
        except Exception as exc:
            log.exception("could not prepare the request")
            metrics.request_done(endpoint, "error")
            return _error_response(APIError(f"internal error: {exc}", status=500, type="server_error"))
        if parsed.stream:
            return StreamingResponse(
                guarded(handler.stream(prepared), endpoint),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await _unless_disconnected(request, handler.complete(prepared))
        except _ClientGone:
            metrics.request_done(endpoint, "aborted")
            return Response(status_code=499)
        except APIError as exc:
            metrics.request_done(endpoint, "error")
            return _error_response(exc)
        except Exception as exc:
            log.exception("request failed")
            metrics.request_done(endpoint, "error")
            return _error_response(APIError(f"internal error: {exc}", status=500, type="server_error"))
        metrics.request_done(endpoint, "ok")
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatCompletionRequest, chat, "chat")

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await serve(request, CompletionRequest, completions, "completions")

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        cards = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "nvfp4kit",
                "root": model_names[0],
                "max_model_len": engine.max_model_len,
            }
            for name in model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/health")
    async def health() -> Response:
        if state["shutting_down"]:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
