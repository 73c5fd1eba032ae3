"""Whether the server's host work slows its decode steps at high concurrency (CPU, no model).

The real server (`create_app`, uvicorn, `AsyncBatchingEngine`) runs around a paced stand-in engine that emulates
the overlap scheduler's timeline: each step launches the next "GPU step" of `--gpu-ms` (a step starts when the
one before ends or when the host launches it, whichever is later), waits for the step before it (a sleep, which
releases the GIL as a CUDA sync does), then appends one scripted token to every running request through the
real `Request.append_token`. `nvfp4kit bench serve` drives it over HTTP from another process (streaming
completions, `--concurrency` clients). Reported: output tok/s, the achieved step period against `--gpu-ms`, and
the share of the run the emulated GPU sat idle waiting for the host (the engine thread late to launch because it
did not hold the GIL: the event loop streaming the tokens of the step before, uvicorn, the client's process
sharing the cores). `--switch-interval` sets `sys.setswitchinterval` in the server (Python's default 5 ms).

    PYTHONPATH=src python scripts/cpu_serve_host_bench.py --concurrency 100 --gpu-ms 14 [--switch-interval 0.0005]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from nvfp4kit.demo import demo_model_path
from nvfp4kit.engine.async_batching import AsyncBatchingEngine
from nvfp4kit.prompting.chat_template import load_chat_template
from nvfp4kit.quant.calib_data import builtin_corpus_path
from nvfp4kit.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_engine_thread_bench import ScriptedStepEngine  # noqa: E402


class PacedEngine(ScriptedStepEngine):
    """`ScriptedStepEngine` with an emulated device timeline of `gpu_s` a step (the overlap scheduler's)."""

    def __init__(self, tokenizer: Tokenizer, script: list[int], gpu_s: float) -> None:
        super().__init__(tokenizer, script, gpu_s)
        self.tokens = 0
        self.gpu_end = 0.0  # when the step in flight ends on the emulated device
        self.idle_s = 0.0  # device time spent waiting for the host to launch
        self.first = self.last = 0.0

    def step(self) -> list:
        now = time.perf_counter()
        if self.steps == 0 or now - self.gpu_end > 1.0:  # the first step of a busy period
            self.gpu_end, self.first = now, self.first or now
        in_flight_end = self.gpu_end
        start = max(in_flight_end, now)  # the next step is launched now; it runs after the one in flight
        self.idle_s += start - in_flight_end
        self.gpu_end = start + self.model_s
        wait = in_flight_end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # reading the tokens of the step in flight (a sync releases the GIL)
        events = self.append_tokens()
        self.tokens += len(events)
        self.last = time.perf_counter()
        self.step_stats.add("decode_graph", self.model_s)
        return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=610)
    p.add_argument("--output-len", type=int, default=422)
    p.add_argument("--gpu-ms", type=float, default=14.0, help="emulated device time of a decode step")
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval in the server")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import uvicorn

    from nvfp4kit.serve.app import create_app

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    folder = demo_model_path()
    tokenizer = Tokenizer(folder)
    corpus = builtin_corpus_path().read_text()[:200_000]
    script = [t for t in tokenizer.encode(corpus, add_bos=False) if t not in (0, 1, 2)]
    engine = PacedEngine(tokenizer, script, args.gpu_ms / 1e3)
    app = create_app(AsyncBatchingEngine(engine), template=load_chat_template(folder), model_names=["paced"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    out = Path(args.json or "/tmp/cpu_serve_host_bench_client.json")
    client = [sys.executable, "-m", "nvfp4kit", "bench", "serve", "--base-url", url, "--no-progress",
              "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
              "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--warmup", "0",
              "--json", str(out)]  # fmt: skip
    subprocess.run(client, check=True, stdout=subprocess.DEVNULL)
    server.should_exit = True
    thread.join(10)
    row = json.loads(out.read_text())["rows"][0]
    busy = engine.last - engine.first
    result = {
        "concurrency": args.concurrency,
        "gpu_ms": args.gpu_ms,
        "switch_interval_s": sys.getswitchinterval(),
        "output_tokens_per_s": row["output_tokens_per_s"],
        "tpot_ms_mean": row["tpot_ms_mean"],
        "steps": engine.steps,
        "rows_per_step": round(engine.tokens / max(engine.steps, 1), 1),
        "step_period_ms": round(1e3 * busy / max(engine.steps, 1), 2),
        "device_idle_share": round(engine.idle_s / max(busy, 1e-9), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
