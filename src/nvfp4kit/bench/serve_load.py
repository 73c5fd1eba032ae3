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
import json
import math
import random
import sys
import time
from pathlib import Path

from nvfp4kit.bench.serve_load_client import Client, _log, check_loopback, parse_counters
from nvfp4kit.bench.serve_load_server import ServerOptions, started_server
from nvfp4kit.bench.serve_load_stats import RequestResult, format_row, steps_by_kind, summarize, ttft_parts
from nvfp4kit.bench.serve_load_workload import Session, corpus_text, make_sessions, sample_lengths

__all__ = [
    "check_loopback",
    "corpus_text",
    "load_levels",
    "parse_counters",
    "register_scenario",
    "sample_lengths",
]


async def run_session(client: Client, session: Session, results: list, bar) -> None:
    """A session's turns in order; a chat turn sends the history, its user message and, later, the reply."""
    history: list[dict] = []
    for turn, (prompt, out_len) in enumerate(zip(session.prompts, session.output_lens)):
        if turn and client.args.think_time:  # the user reads the reply before answering
            await asyncio.sleep(client.args.think_time)
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
                row["server_steps"] = steps_by_kind(row["server_counters"])
                row["server_ttft_ms"] = ttft_parts(row["server_counters"])
            rows.append(row)
            _log(format_row(row))
        return {"model": model, "rows": rows}
    finally:
        await client.close()


WORKLOAD_FIELDS = ("input_len", "input_range", "output_len", "output_range", "turns", "think_time", "n",
                   "temperature", "ignore_eos", "seed", "warmup", "endpoint")  # fmt: skip


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
    w.add_argument("--think-time", type=float, default=0.0, metavar="S",
                   help="seconds a conversation waits after a reply before its next turn (a user reading it; "
                   "default 0: at once)")  # fmt: skip
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
