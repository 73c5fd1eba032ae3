"""How much host time the server's engine thread spends per step on things other than the model (CPU).

A scripted engine stands in for `Engine`: its step sleeps `--model-ms` (the GPU's share, which releases the
GIL as a CUDA sync does), then appends the next scripted token of every running request through the real
`Request.append_token`. `AsyncBatchingEngine` runs it on its worker thread, and `--streams` consumers read
the token streams on the event loop as the HTTP handlers do. Reported: the worker thread's CPU time per step
(everything it does besides sleeping: token bookkeeping, detokenization if it runs there, handing events to
the event loop, gauges) and the event loop's CPU time per token. Runs against whichever nvfp4kit is on the
path, so the same script measures a checkout before and after a change:

    OMP_NUM_THREADS=1 python scripts/cpu_engine_thread_bench.py --streams 64 --tokens 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace

from nvfp4kit.demo import demo_model_path
from nvfp4kit.engine.async_batching import AsyncBatchingEngine
from nvfp4kit.engine.request import make_request
from nvfp4kit.engine.step_stats import StepStats
from nvfp4kit.quant.calib_data import builtin_corpus_path
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer


class ScriptedStepEngine:
    """The part of `Engine` the async worker uses; every step is one token for every running request."""

    def __init__(self, tokenizer: Tokenizer, script: list[int], model_s: float) -> None:
        self.tokenizer, self.script, self.model_s = tokenizer, script, model_s
        self.max_model_len = 1 << 16
        self.model = SimpleNamespace(config=SimpleNamespace(eos_token_ids=(1,)))
        self.requests: dict = {}
        self.steps = 0
        self.step_cpu_s = 0.0  # CPU time inside step() apart from the sleep: token bookkeeping (+ detok)
        self.step_stats = StepStats()  # what the async worker reads for /metrics

    def add_request(self, prompt_ids, params, *, request_id, images=None, background=False) -> str:
        self.requests[request_id] = make_request(
            request_id, prompt_ids, params, tokenizer=self.tokenizer, eos_ids=(1,)
        )
        return request_id

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        time.sleep(self.model_s)
        return self.append_tokens()

    def append_tokens(self) -> list:
        """One scripted token for every running request, through the real `Request.append_token`."""
        start = time.thread_time()
        events = []
        for request_id, req in list(self.requests.items()):
            offset = 7 * int(request_id.rsplit("-", 1)[-1])  # each stream its own stretch of text
            token = self.script[(offset + len(req.output_ids)) % len(self.script)]
            event = req.append_token(token, -0.25, [])
            events.append(event)
            if event.finish_reason:
                del self.requests[request_id]
        self.steps += 1
        self.step_cpu_s += time.thread_time() - start
        return events

    def stats(self) -> dict:
        return {"running": len(self.requests), "waiting": 0, "kv_global_usage": 0.0, "kv_sliding_usage": 0.0,
                "preemptions": 0, "background": 0}  # fmt: skip


async def run(args: argparse.Namespace) -> dict:
    tokenizer = Tokenizer(demo_model_path())
    corpus = builtin_corpus_path().read_text()[:200_000]
    script = [t for t in tokenizer.encode(corpus, add_bos=False) if t not in (0, 1, 2)]
    engine = ScriptedStepEngine(tokenizer, script, args.model_ms / 1e3)
    server = AsyncBatchingEngine(engine)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, stop=("@@never@@",))
    prompt = tokenizer.encode("Tell me a long story.")
    texts: list[str] = []

    async def consume() -> None:
        text = ""
        async for event in server.stream(prompt, params):
            text += event.text
        texts.append(text)

    clock = time.pthread_getcpuclockid(server._worker.ident)
    worker_start, loop_start, wall = time.clock_gettime(clock), time.thread_time(), time.perf_counter()
    await asyncio.gather(*(consume() for _ in range(args.streams)))
    worker_s = time.clock_gettime(clock) - worker_start
    loop_s, wall = time.thread_time() - loop_start, time.perf_counter() - wall
    await server.close()
    steps, tokens = engine.steps, args.streams * args.tokens
    return {
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "model_ms_per_step": args.model_ms,
        "steps": steps,
        "wall_s": round(wall, 3),
        "engine_thread_ms_per_step": round(1e3 * worker_s / steps, 3),
        "in_step_bookkeeping_ms_per_step": round(1e3 * engine.step_cpu_s / steps, 3),
        "outside_step_ms_per_step": round(1e3 * (worker_s - engine.step_cpu_s) / steps, 3),
        "event_loop_us_per_token": round(1e6 * loop_s / tokens, 2),
        "text_chars": sum(map(len, texts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--model-ms", type=float, default=10.0, help="sleep per step standing in for the GPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
