"""The HTTP side of `nvfp4kit bench serve`: a loopback-only OpenAI client that streams one request and times it
(time to the first token, gaps between chunks, usage), the prompt pool from `/tokenize`, and the server's token
counters from `/metrics`. httpx is imported when a client is made."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from urllib.parse import urlsplit

from nvfp4kit.bench.serve_load_stats import RequestResult
from nvfp4kit.bench.serve_load_workload import TokenPool, corpus_text


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_loopback(base_url: str) -> str:
    """`base_url` without a trailing slash, if its host is a loopback address (else ValueError)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(
            f"--base-url must be http(s) on a loopback address (127.0.0.1, ::1, localhost): {base_url}"
        )
    return base_url.rstrip("/")


class Client:
    def __init__(self, base_url: str, *, api_key: str | None, model: str | None, args: argparse.Namespace):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=httpx.Timeout(None, connect=30.0), limits=limits,
            trust_env=False,  # loopback only: never through a proxy from the environment
        )  # fmt: skip
        self.model = model
        self.args = args
        self.extra_body = json.loads(args.extra_body) if args.extra_body else {}

    async def close(self) -> None:
        await self.http.aclose()

    async def model_name(self) -> str:
        if self.model is None:
            reply = await self.http.get("/v1/models")
            reply.raise_for_status()
            self.model = reply.json()["data"][0]["id"]
        return self.model

    async def token_pool(self) -> TokenPool:
        text = corpus_text()
        reply = await self.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        if reply.status_code != 200:
            _log(
                f"no /tokenize on the server ({reply.status_code}): prompt lengths are approximate (4 chars/token)"
            )
            return TokenPool(ids=[0], text=text, approximate=True)
        return TokenPool(ids=reply.json()["tokens"])

    async def counters(self) -> dict[str, float]:
        """The server's token counters from `/metrics` (Prometheus text; {} when there is none)."""
        try:
            reply = await self.http.get("/metrics")
        except Exception:
            return {}
        return parse_counters(reply.text) if reply.status_code == 200 else {}

    async def detokenize(self, ids: list[int]) -> str:
        reply = await self.http.post("/detokenize", json={"tokens": ids})
        reply.raise_for_status()
        return reply.json()["prompt"]

    def payload(self, prompt, max_tokens: int) -> dict:
        args = self.args
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": args.temperature,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        if args.ignore_eos:
            body["ignore_eos"] = True
        if args.n > 1:
            body["n"] = args.n
        body["messages" if args.endpoint == "chat" else "prompt"] = prompt
        return {**body, **self.extra_body}

    async def stream(self, prompt, max_tokens: int, turn: int = 0) -> RequestResult:
        """One streamed request: time to the first token, gaps between chunks, the usage at the end."""
        route = "/v1/chat/completions" if self.args.endpoint == "chat" else "/v1/completions"
        result = RequestResult(turn=turn)
        chunks, last = 0, 0.0
        start = time.perf_counter()
        try:
            async with self.http.stream("POST", route, json=self.payload(prompt, max_tokens)) as reply:
                if reply.status_code != 200:
                    body = (await reply.aread()).decode(errors="replace")
                    result.error = f"HTTP {reply.status_code}: {body[:300]}"
                    return result
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        result.error = str(event["error"].get("message", event["error"]))[:300]
                        return result
                    now = time.perf_counter()
                    streamed, text = _chunk_text(event)
                    result.text += text
                    if streamed:
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        chunks, last = chunks + 1, now
                    if usage := event.get("usage"):
                        result.prompt_tokens = usage.get("prompt_tokens", 0)
                        result.output_tokens = usage.get("completion_tokens", 0)
                        details = usage.get("prompt_tokens_details") or {}
                        result.cached_tokens = details.get("cached_tokens")
        except Exception as exc:  # a refused connection, a cut stream: this request failed, the run goes on
            result.error = f"{type(exc).__name__}: {exc}"[:300]
            return result
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        if not result.prompt_tokens and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            result.prompt_tokens = len(prompt)
        result.ok = result.ttft is not None
        result.error = "" if result.ok else "no token streamed"
        return result


STEP_COUNTERS = (
    "engine_steps_total",
    "engine_step_seconds_total",
    "engine_step_device_seconds_total",
)  # kept per label: steps and seconds by kind
# the server's time to first token and its two parts (histogram sums and counts: means over a level)
TTFT_PARTS = (
    "time_to_first_token_seconds",
    "request_preprocess_seconds",
    "request_engine_first_token_seconds",
)


def parse_counters(text: str) -> dict[str, float]:
    """`*_tokens_total` counters of a Prometheus text page (prompt, generation, prefill, cached tokens; labels
    summed over), the engine's steps and step seconds per kind (`STEP_COUNTERS`, label kept), and the sums and
    counts of the server's TTFT histograms (`TTFT_PARTS`)."""
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if "{" in line and "}" in line:  # labels: summed over, but for the step counters
            name, value = line[: line.index("{")], line[line.rindex("}") + 1 :]
            if name.endswith(STEP_COUNTERS):
                name = line[: line.rindex("}") + 1]
        else:
            name, _, value = line.partition(" ")
        histogram_total = name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0].endswith(TTFT_PARTS)
        if name.endswith("tokens_total") or name.split("{")[0].endswith(STEP_COUNTERS) or histogram_total:
            try:
                counters[name] = counters.get(name, 0.0) + float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return counters


def _chunk_text(event: dict) -> tuple[bool, str]:
    """(whether the chunk streams any output, the text of choice 0: what a conversation keeps)."""
    streamed, first = False, ""
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        text = (choice.get("text") or "") + (delta.get("content") or "")
        calls = "".join(
            (c.get("function") or {}).get("arguments") or "." for c in delta.get("tool_calls") or []
        )
        # a token's logprobs count too: markup the chat parsers hold back (random weights) still is a token
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("content") or logprobs.get("tokens")
        streamed = streamed or bool(text or calls or delta.get("reasoning_content") or tokens)
        if choice.get("index", 0) == 0:
            first += text
    return streamed, first
