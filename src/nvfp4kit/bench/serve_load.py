"""`nvfp4kit bench serve`: a load generator for an OpenAI-compatible server, measured as its users see it.

Against a running server (`--base-url`, loopback only) or one it starts itself (`nvfp4kit serve` on a free
loopback port, stopped at the end), it sends streaming completions with synthetic prompts: windows of the
package's calibration corpus, tokenized by the server's `/tokenize`, with random lengths of a given mean and
range (fixed seed). Load levels: a `--concurrency` sweep and/or `--request-rate` (Poisson arrivals); each level
gets its own prompts, so a prefix cache gains nothing across levels. `--turns K` runs conversations of K turns,
each appending a user message to the growing history (and the reply before it). Reported per level: request
throughput, input/output tokens/s, TTFT, TPOT (per request, after the first token) and ITL (between streamed
chunks) as mean, p50 and p99, and TTFT per turn; JSON rows with `--json`.

Only this module's parser is built at `nvfp4kit bench --help`: httpx and tqdm are imported when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nvfp4kit.bench.serve_load_server import ServerOptions, started_server
from nvfp4kit.bench.serve_load_stats import RequestResult, format_row, summarize


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


# ---------------------------------------------------------------- workload


def sample_lengths(rng: random.Random, mean: int, spread: float, count: int) -> list[int]:
    """`count` lengths uniform in [mean * (1 - spread), mean * (1 + spread)] (at least 1)."""
    low = max(1, math.floor(mean * (1 - spread)))
    high = max(low, math.ceil(mean * (1 + spread)))
    return [rng.randint(low, high) for _ in range(count)]


def corpus_text() -> str:
    """The package's calibration corpus (prose, code, chats) without Gemma's control-token markup."""
    import re

    file = Path(__file__).resolve().parent.parent / "assets" / "calibration" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in file.read_text().splitlines() if line.strip()]
    return re.sub(r"<\|[^<>\s]{0,24}>|<[^<>\s|]{1,24}\|>", " ", "\n\n".join(texts))


@dataclass
class TokenPool:
    """Prompts cut from a token sequence at random offsets: ids (exact lengths) or text (`/detokenize`d).

    Without a `/tokenize` route the pool is the corpus's characters, about 4 per token (`approximate`)."""

    ids: list[int]
    text: str = ""
    approximate: bool = False

    def window(self, rng: random.Random, length: int) -> list[int]:
        start = rng.randrange(len(self.ids))
        reps = (start + length) // len(self.ids) + 1
        return (self.ids * reps)[start : start + length] if reps > 1 else self.ids[start : start + length]

    def text_window(self, rng: random.Random, length: int) -> str:
        start = rng.randrange(len(self.text))
        return (self.text * ((start + 4 * length) // len(self.text) + 1))[start : start + 4 * length]


@dataclass
class Session:
    """A single request (one turn) or a conversation: per turn a user prompt and an output length."""

    prompts: list  # token ids (completions) or text
    output_lens: list[int]


# ---------------------------------------------------------------- HTTP


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


def parse_counters(text: str) -> dict[str, float]:
    """`*_tokens_total` counters of a Prometheus text page (prompt, generation, prefill, cached tokens)."""
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if "{" in line and "}" in line:  # labels: summed over
            name, value = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, value = line.partition(" ")
        if name.endswith("tokens_total") and not name.startswith("#"):
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
        streamed = streamed or bool(text or calls or delta.get("reasoning_content"))
        if choice.get("index", 0) == 0:
            first += text
    return streamed, first


# ---------------------------------------------------------------- load levels


async def make_sessions(client: Client, pool: TokenPool, args: argparse.Namespace, count: int, seed: int):
    """`count` sessions of `args.turns` turns from a generator seeded with `seed`."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(count):
        in_lens = sample_lengths(rng, args.input_len, args.input_range, args.turns)
        out_lens = sample_lengths(rng, args.output_len, args.output_range, args.turns)
        prompts: list = []
        for length in in_lens:
            if pool.approximate:
                prompts.append(pool.text_window(rng, length))
            elif args.endpoint == "chat":
                prompts.append(await client.detokenize(pool.window(rng, length)))
            else:
                prompts.append(pool.window(rng, length))
        sessions.append(Session(prompts, out_lens))
    return sessions


async def run_session(client: Client, session: Session, results: list, bar) -> None:
    """A session's turns in order; a chat turn sends the history, its user message and, later, the reply."""
    history: list[dict] = []
    for turn, (prompt, out_len) in enumerate(zip(session.prompts, session.output_lens)):
        if client.args.endpoint == "chat":
            history.append({"role": "user", "content": prompt})
            result = await client.stream(list(history), out_len, turn)
            history.append({"role": "assistant", "content": result.text})
        else:
            result = await client.stream(prompt, out_len, turn)
        results.append(result)
        if bar is not None:
            bar.update(1)
        if not result.ok:  # the conversation cannot go on; its later turns count as failed
            results.extend(
                RequestResult(turn=t, error="earlier turn failed")
                for t in range(turn + 1, len(session.prompts))
            )
            return


async def run_level(client: Client, sessions: list[Session], *, concurrency: int | None, rate: float,
                    seed: int, desc: str, progress: bool) -> tuple[list[RequestResult], float]:  # fmt: skip
    """Start sessions at Poisson arrivals of `rate` per second (all at once when infinite), at most
    `concurrency` running; returns every request's result and the wall time from the first start."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(sessions) or 1)
    results: list[RequestResult] = []
    total = sum(len(s.prompts) for s in sessions)
    bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not progress, leave=False)

    async def one(session: Session) -> None:
        async with limit:
            await run_session(client, session, results, bar)

    start = time.perf_counter()
    tasks = []
    for i, session in enumerate(sessions):
        tasks.append(asyncio.create_task(one(session)))
        if math.isfinite(rate) and i + 1 < len(sessions):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


def load_levels(args: argparse.Namespace) -> list[tuple[int | None, float]]:
    """(concurrency, request rate) pairs: every concurrency with every rate."""
    concurrencies = args.concurrency or ([None] if args.request_rate else [1])
    rates = args.request_rate or [math.inf]
    return [(c, r) for c in concurrencies for r in rates]


async def benchmark(base_url: str, args: argparse.Namespace) -> dict:
    client = Client(base_url, api_key=args.api_key, model=args.model_name, args=args)
    try:
        model = await client.model_name()
        pool = await client.token_pool()
        _log(f"{base_url}: model {model}, {args.endpoint}, prompt pool {len(pool.ids)} tokens")
        if args.warmup:
            warm = await make_sessions(client, pool, args, args.warmup, seed=args.seed - 1)
            results, _ = await run_level(client, warm, concurrency=None, rate=math.inf, seed=args.seed,
                                         desc="warm-up", progress=args.progress)  # fmt: skip
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"warm-up requests failed: {failed[0]}")
        rows = []
        for index, (concurrency, rate) in enumerate(load_levels(args)):
            count = args.num_prompts or max(10, 10 * (concurrency or 1))
            sessions = await make_sessions(client, pool, args, count, seed=args.seed + 1000 * (index + 1))
            desc = f"concurrency {concurrency or 'inf'}, rate {rate:g}/s"
            before = await client.counters()
            results, duration = await run_level(client, sessions, concurrency=concurrency, rate=rate,
                                                seed=args.seed + index, desc=desc, progress=args.progress)  # fmt: skip
            row = {"scenario": "serve_multiturn" if args.turns > 1 else "serve", "endpoint": args.endpoint,
                   "concurrency": concurrency, "request_rate": rate if math.isfinite(rate) else None,
                   "sessions": count, "turns": args.turns, **summarize(results, duration)}  # fmt: skip
            after = await client.counters()
            if after:  # what the server counted during the level (e.g. prefill tokens with a prefix cache)
                row["server_counters"] = {k: after[k] - before.get(k, 0.0) for k in sorted(after)}
            rows.append(row)
            _log(format_row(row))
        return {"model": model, "rows": rows}
    finally:
        await client.close()


WORKLOAD_FIELDS = ("input_len", "input_range", "output_len", "output_range", "turns", "n", "temperature",
                   "ignore_eos", "seed", "warmup", "endpoint")  # fmt: skip


def run_serve_benchmark(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if args.turns > 1 and args.endpoint == "completions":
        raise ValueError("--turns > 1 needs --endpoint chat (a conversation's history is chat messages)")
    args.endpoint = args.endpoint or ("chat" if args.turns > 1 else "completions")
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "command": "nvfp4kit bench serve " + " ".join(sys.argv[sys.argv.index("serve") + 1 :])
        if "serve" in sys.argv
        else "nvfp4kit bench serve",
        "workload": {k: getattr(args, k) for k in WORKLOAD_FIELDS},
    }
    if args.base_url:
        base_url = check_loopback(args.base_url)
        result.update(base_url=base_url, server="external", **asyncio.run(benchmark(base_url, args)))
    else:
        options = ServerOptions(model=args.model, random_weights=args.random_weights, device=args.device,
                                extra=args.serve_args, timeout_s=args.server_timeout, api_key=args.api_key)  # fmt: skip
        with started_server(options, log=_log) as server:
            result.update(base_url=server.base_url, server=" ".join(server.command[1:]))
            result.update(asyncio.run(benchmark(server.base_url, args)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['model']} at {result['base_url']} ({args.endpoint}, turns {args.turns})")
    for row in result["rows"]:
        print(format_row(row))
    return 0 if all(r["failed"] == 0 for r in result["rows"]) else 1


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 (inf: all at once), got {text}")
    return value


def register_scenario(scenarios: argparse._SubParsersAction) -> None:
    p = scenarios.add_parser(
        "serve", help="HTTP load generator: throughput, TTFT/TPOT/ITL at concurrencies or request rates",
        description=__doc__.split("\n\n")[1],
    )  # fmt: skip
    src = p.add_argument_group("server (default: start `nvfp4kit serve` on a free loopback port)")
    src.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:30000 (loopback only)")
    src.add_argument("--model", help="checkpoint folder for the started server (default: the built-in demo)")
    src.add_argument("--random-weights", metavar="SHAPE", help="start the server on random weights (26b-a4b)")
    src.add_argument("--device", default="cpu", help="the started server's device (default cpu)")
    src.add_argument("--serve-args", default="", help="more `nvfp4kit serve` options, one string")
    src.add_argument("--server-timeout", type=float, default=1800, help="seconds to wait for /health")
    src.add_argument("--api-key", default=None, help="bearer key for the server's /v1 routes")
    src.add_argument(
        "--model-name", default=None, help="the `model` field to send (default: the first listed)"
    )
    w = p.add_argument_group("workload")
    w.add_argument("--endpoint", choices=("completions", "chat"), default=None,
                   help="completions (token-id prompts of exact lengths; default) or chat (text; --turns > 1)")  # fmt: skip
    w.add_argument("--input-len", type=int, default=1024, help="mean prompt tokens per request or turn")
    w.add_argument("--input-range", type=float, default=0.0, help="lengths uniform in mean * (1 +- range)")
    w.add_argument("--output-len", type=int, default=128, help="mean output tokens (max_tokens)")
    w.add_argument("--output-range", type=float, default=0.0, help="as --input-range for outputs")
    w.add_argument("--turns", type=int, default=1, help="turns per conversation (> 1: multi-turn chat)")
    w.add_argument("--num-prompts", type=int, default=None,
                   help="requests (conversations) per level (default 10 x concurrency, at least 10)")  # fmt: skip
    w.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels of requests in flight")
    w.add_argument("--request-rate", type=_rate, nargs="+", default=None,
                   help="Poisson arrivals per second (inf: all at once); with --concurrency as a cap")  # fmt: skip
    w.add_argument("--warmup", type=int, default=2, help="requests (conversations) sent before measuring")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--n", type=int, default=1, help="choices per request (output tokens count them all)")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let outputs stop at EOS (default: exactly max_tokens each)")  # fmt: skip
    w.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    w.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_serve_benchmark)
