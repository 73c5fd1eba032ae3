"""Server metrics in Prometheus' text format (`GET /metrics`), without a client library.

Counters: requests by endpoint and outcome, prompt and generated tokens, Triton kernel compilations (all, and
those after the start-up warm-up: each one stalled a serving step), preemptions, and engine steps with their wall
seconds by kind (where a load test's time went) and, for decode steps on CUDA, their GPU seconds. Histograms: time
to first token, split into the server's preprocessing (arrival to the prompt handed to the engine) and the
engine's part (queueing, prefill, the first step), and inter-token latency. Gauges: clients' requests running and
waiting, and the server's background requests (history warm-ups, not counted in those two), read from the engine
when scraped.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

from nvfp4kit.engine.kernel_compiles import kernel_compile_counts
from nvfp4kit.serve.engine_protocol import EngineStats

PREFIX = "nvfp4kit"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help_text = help_text
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self) -> list[str]:
        full = f"{PREFIX}_{self.name}"
        out = [f"# HELP {full} {self.help_text}", f"# TYPE {full} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            out.append(f'{full}_bucket{{le="{bound}"}} {count}')
        out += [
            f'{full}_bucket{{le="+Inf"}} {self.count}',
            f"{full}_sum {self.total}",
            f"{full}_count {self.count}",
        ]
        return out


class ServerMetrics:
    """Thread-safe counters the request handlers update and `/metrics` renders."""

    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self._engine_stats = engine_stats
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time from request arrival to its first token.", TTFT_BUCKETS
        )
        self.itl = Histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of a request.", ITL_BUCKETS
        )
        self.preprocess = Histogram(
            "request_preprocess_seconds",
            "Time from request arrival to its prompt handed to the engine (validation, chat template, tokenizing).",
            TTFT_BUCKETS,
        )
        self.engine_first_token = Histogram(
            "request_engine_first_token_seconds",
            "Time from the prompt handed to the engine to its first token (queueing, prefill, the first step).",
            TTFT_BUCKETS,
        )

    def request_done(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            self.requests[(endpoint, outcome)] += 1

    def add_prompt_tokens(self, count: int) -> None:
        with self._lock:
            self.prompt_tokens += count

    def add_cached_tokens(self, count: int) -> None:
        with self._lock:
            self.cached_prompt_tokens += count

    def submitted(self, since_arrival: float) -> None:
        """A prompt handed to the engine, `since_arrival` seconds after its HTTP request arrived."""
        with self._lock:
            self.preprocess.observe(since_arrival)

    def token(
        self,
        *,
        since_previous: float | None,
        since_arrival: float | None,
        since_submitted: float | None = None,
    ) -> None:
        """One generated token: the first of a request gives its TTFT (and the engine's part of it, from
        `since_submitted`), later ones an inter-token gap."""
        with self._lock:
            self.generation_tokens += 1
            if since_arrival is not None:
                self.ttft.observe(since_arrival)
            if since_submitted is not None:
                self.engine_first_token.observe(since_submitted)
            if since_previous is not None:
                self.itl.observe(since_previous)

    def render(self) -> str:
        stats = self._engine_stats()
        with self._lock:
            lines = [
                f"# HELP {PREFIX}_requests_total Finished requests by endpoint and outcome.",
                f"# TYPE {PREFIX}_requests_total counter",
            ]
            for (endpoint, outcome), count in sorted(self.requests.items()):
                lines.append(f'{PREFIX}_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {count}')
            lines += _single("prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
            lines += _single(
                "prompt_tokens_cached_total", "counter", "Prompt tokens served by the prefix cache.",
                self.cached_prompt_tokens,
            )  # fmt: skip
            lines += _single(
                "generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens
            )
            lines += self.ttft.lines() + self.preprocess.lines() + self.engine_first_token.lines()
            lines += self.itl.lines()
        if (prefilled := getattr(stats, "prefill_tokens", None)) is not None:
            text = "Prompt tokens run through the model (prompt tokens minus prefix-cache hits)."
            lines += _single("prefill_tokens_total", "counter", text, prefilled)
        compiles, after_warmup = kernel_compile_counts()
        text = "Triton kernel variants compiled (or loaded from Triton's disk cache) in this process."
        lines += _single("kernel_compiles_total", "counter", text, compiles)
        text = "Of those, the ones after the start-up warm-up: each stalled a serving step."
        lines += _single("kernel_compiles_after_warmup_total", "counter", text, after_warmup)
        lines += _single(
            "preemptions_total", "counter", "Requests pushed back to the queue: the KV pools ran short.",
            stats.preemptions,
        )  # fmt: skip
        lines += _labelled(
            "engine_steps_total", "counter", "Engine steps by kind (decode from a CUDA graph, eager decode, "
            "steps with prefill chunks run eagerly or replayed from a prefill graph).", {kind: n for kind, n, *_ in stats.steps},
        )  # fmt: skip
        lines += _labelled(
            "engine_step_seconds_total", "counter", "Wall seconds the engine thread spent in steps, by kind.",
            {kind: seconds for kind, _, seconds, _ in stats.steps},
        )  # fmt: skip
        lines += _labelled(
            "engine_step_device_seconds_total", "counter", "GPU seconds of the decode steps (CUDA events around "
            "each step's forward and sampling), by kind: wall seconds above them are the GPU waiting for the host.",
            {kind: device for kind, _, _, device in stats.steps if kind.startswith("decode")},
        )  # fmt: skip
        lines += _single("num_requests_running", "gauge", "Clients' requests generating now.", stats.running)
        lines += _single(
            "num_requests_waiting", "gauge", "Clients' requests queued for the engine.", stats.waiting
        )
        text = "The server's own background requests (chat history warm-ups), running or queued."
        lines += _single("num_requests_background", "gauge", text, stats.background)
        for pool in ("global", "sliding"):
            usage = getattr(stats, f"kv_{pool}_usage", None)
            if usage is not None:
                lines += _single(
                    f"kv_{pool}_usage", "gauge", f"Fraction of the {pool}-layer KV pool in use.", usage
                )
        return "\n".join(lines) + "\n"


def _labelled(name: str, kind: str, help_text: str, values: dict[str, float]) -> list[str]:
    full = f"{PREFIX}_{name}"
    return [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"] + [
        f'{full}{{kind="{label}"}} {value}' for label, value in values.items()
    ]


def _single(name: str, kind: str, help_text: str, value: float) -> list[str]:
    full = f"{PREFIX}_{name}"
    return [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {value}"]
