"""The FastAPI application: OpenAI-compatible routes, API-key check, errors in OpenAI's shape, metrics.

Every client mistake gets a 4xx with a message that says what to fix, and the server keeps serving;
a client that disconnects aborts its request. Nothing slow runs on the event loop: bodies are size-limited
and parsed, prompts rendered and tokenized on a small worker pool. Shutdown (SIGTERM) drains with a bound
(`serve/shutdown.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvfp4kit.engine.async_batching import RequestFailed
from nvfp4kit.prompting.chat_template import ChatTemplate
from nvfp4kit.serve.chat import ChatHandler
from nvfp4kit.serve.completions import CompletionHandler
from nvfp4kit.serve.engine_protocol import AsyncEngine
from nvfp4kit.serve.errors import APIError, from_validation_error
from nvfp4kit.serve.history_warmup import HistoryWarmup
from nvfp4kit.serve.metrics import ServerMetrics
from nvfp4kit.serve.protocol import ChatCompletionRequest, CompletionRequest
from nvfp4kit.serve.responses import ResponsesHandler
from nvfp4kit.serve.responses_input import ResponsesRequest
from nvfp4kit.serve.shutdown import Drainer
from nvfp4kit.serve.streaming import SSE_DONE, sse
from nvfp4kit.serve.tokenizer_routes import add_tokenizer_routes, model_card

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.25


class _ClientGone(Exception):
    pass


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


DEFAULT_MAX_BODY_BYTES = 32 * 2**20
_INLINE_PARSE_BYTES = 64 * 2**10  # bodies larger than this are parsed on a worker thread


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send numbers only")


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise APIError(f"the request body is not valid JSON ({exc}); send a JSON object") from exc
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


async def _json_body(request: Request, *, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read up to `limit` bytes (413 beyond), parsed off the loop when large."""
    too_large = APIError(
        f"the request body is larger than this server's limit of {limit} bytes",
        status=413,
        code="body_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) <= _INLINE_PARSE_BYTES:
        return _parse_json(raw)
    return await asyncio.to_thread(_parse_json, raw)


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    drain_timeout: float = 30.0,
    public_metrics: bool = False,
    warm_history: bool = False,
) -> FastAPI:
    """The server application around `engine`; `model_names[0]` is the main name, the rest aliases.

    `api_key` (if given) guards every route but `/health` (and `/metrics` with `public_metrics`);
    `drain_timeout` is how long running requests may go on after SIGTERM (`serve --graceful-timeout`).
    `warm_history`: prefill a finished chat's history at idle for its next turn (`serve/history_warmup.py`).
    """
    if not model_names:
        raise ValueError("model_names must name the served model at least once")
    if api_key is not None and not api_key.strip():
        raise ValueError(
            "the API key is empty; pass a non-empty --api-key (or $NVFP4KIT_API_KEY), or none at all"
        )
    log.info("API key authentication is %s", "on" if api_key else "off (anyone who can connect may use it)")
    metrics = ServerMetrics(engine.stats)
    # Template rendering and tokenizing hold the GIL, so a pool of two keeps a flood of huge prompts from
    # starving the engine thread and the event loop; they queue here instead.
    preparers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nvfp4kit-prepare")
    warmup = None
    if warm_history:
        warmup = HistoryWarmup(
            engine, template, render_in=lambda fn: asyncio.get_running_loop().run_in_executor(preparers, fn)
        )
    chat = ChatHandler(engine, template, metrics, warmup=warmup)
    completions = CompletionHandler(engine, metrics)
    responses = ResponsesHandler(chat)
    started = int(time.time())
    drainer = Drainer(drain_timeout=drain_timeout, abort_all=getattr(engine, "abort_all", lambda: None))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()  # where begin_shutdown runs (tests call it from a thread)
        drainer.install_signal_handlers()
        yield
        drainer.draining = True
        await engine.close()
        preparers.shutdown(wait=False, cancel_futures=True)

    docs_open = not api_key  # with a key, the OpenAPI schema is served behind it and the HTML docs are off
    app = FastAPI(
        title="nvfp4kit",
        lifespan=lifespan,
        docs_url="/docs" if docs_open else None,
        redoc_url="/redoc" if docs_open else None,
        openapi_url="/openapi.json" if docs_open else None,
    )
    app.state.metrics = metrics
    app.state.drainer = drainer

    def refused(request: Request) -> JSONResponse | None:
        """The 401 for a request without the right key (checked in the routes: an HTTP middleware would
        hide client disconnects from the handlers). The scheme is case-insensitive (RFC 7235)."""
        if not api_key:
            return None
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode()):
            return None
        response = _error_response(
            APIError(
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
            )
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="nvfp4kit"'
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    def resolve_model(name: str | None) -> str:
        if name is None:  # the answers name the model that served them
            return model_names[0]
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
        drainer.request_started()  # counted from the first chunk: a body never started has nothing to drain
        try:
            async with contextlib.aclosing(chunks) as events:
                async for text in events:
                    yield text
            outcome = "ok"
        except APIError as exc:
            outcome = "error"
            yield sse(exc.body())
            yield SSE_DONE
        except RequestFailed as exc:
            outcome = "error"
            log.warning("streamed request failed: %s", exc)
            yield sse(APIError(f"the request failed: {exc}", status=500, type="server_error").body())
            yield SSE_DONE
        except Exception as exc:
            outcome = "error"
            log.exception("streamed request failed")
            yield sse(APIError(f"internal error: {exc}", status=500, type="server_error").body())
            yield SSE_DONE
        finally:
            metrics.request_done(endpoint, outcome)
            drainer.request_ended()

    async def prepare(request: Request, schema: type[BaseModel], handler: Any) -> tuple[Any, Any]:
        body = await _json_body(request, limit=max_body_bytes)
        parsed = schema.model_validate(body)
        model = resolve_model(parsed.model)
        loop = asyncio.get_running_loop()
        return parsed, await loop.run_in_executor(preparers, lambda: handler.prepare(parsed, model=model))

    async def serve(request: Request, schema: type[BaseModel], handler: Any, endpoint: str) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        if drainer.draining:
            return _error_response(APIError("the server is shutting down", status=503, type="server_error"))
        try:
            parsed, prepared = await prepare(request, schema, handler)
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
        drainer.request_started()
        try:
            result = await _unless_disconnected(request, handler.complete(prepared))
        except _ClientGone:
            metrics.request_done(endpoint, "aborted")
            return Response(status_code=499)
        except APIError as exc:
            metrics.request_done(endpoint, "error")
            return _error_response(exc)
        except RequestFailed as exc:
            log.warning("request failed: %s", exc)
            metrics.request_done(endpoint, "error")
            return _error_response(APIError(f"the request failed: {exc}", status=500, type="server_error"))
        except Exception as exc:
            log.exception("request failed")
            metrics.request_done(endpoint, "error")
            return _error_response(APIError(f"internal error: {exc}", status=500, type="server_error"))
        finally:
            drainer.request_ended()
        metrics.request_done(endpoint, "ok")
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatCompletionRequest, chat, "chat")

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await serve(request, CompletionRequest, completions, "completions")

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await serve(request, ResponsesRequest, responses, "responses")

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        cards = [
            model_card(name, root=model_names[0], created=started, max_model_len=engine.max_model_len)
            for name in model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    add_tokenizer_routes(
        app,
        engine=engine,
        template=template,
        model_names=model_names,
        created=started,
        refused=refused,
        read_body=lambda request: _json_body(request, limit=max_body_bytes),
        executor=preparers,
    )

    @app.get("/health")
    async def health() -> Response:
        if drainer.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not public_metrics and (refusal := refused(request)) is not None:
            return refusal
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    if not docs_open:

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_schema(request: Request) -> Response:
            if (refusal := refused(request)) is not None:
                return refusal
            return JSONResponse(app.openapi())

    return app
