"""Statistics of `nvfp4kit bench serve`: one request as the client saw it, a load level's summary row (throughput,
TTFT / TPOT / ITL / end-to-end latency as mean, p50, p99 in ms, TTFT and prompt tokens per turn) and its line of text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LATENCIES = ("ttft", "tpot", "itl", "e2e")
PREFIX = "nvfp4kit"  # the server's metric names (serve/metrics.py)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from sending it."""

    turn: int = 0
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Aggregate metrics of one load level (latencies in ms)."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    row: dict = {
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 3) if duration > 0 else None,
        "input_tokens_per_s": round(in_tokens / duration, 1) if duration > 0 else None,
        "output_tokens_per_s": round(out_tokens / duration, 1) if duration > 0 else None,
        "total_tokens_per_s": round((in_tokens + out_tokens) / duration, 1) if duration > 0 else None,
        "mean_input_tokens": round(in_tokens / len(done), 1) if done else None,
        "mean_output_tokens": round(out_tokens / len(done), 1) if done else None,
    }
    samples = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2e": [r.latency for r in done],
    }
    for name in LATENCIES:
        values = samples[name]
        mean = sum(values) / len(values) if values else None
        for stat, value in (("mean", mean), ("p50", percentile(values, 50)), ("p99", percentile(values, 99))):
            row[f"{name}_ms_{stat}"] = None if value is None else round(1e3 * value, 2)
    turns = sorted({r.turn for r in results})
    if len(turns) > 1:
        by_turn = [[r for r in done if r.turn == t] for t in turns]
        row["ttft_ms_mean_by_turn"] = [_mean_ms([r.ttft for r in rs if r.ttft is not None]) for rs in by_turn]
        row["input_tokens_mean_by_turn"] = [_mean([r.prompt_tokens for r in rs]) for rs in by_turn]
        cached = [[r.cached_tokens for r in rs if r.cached_tokens is not None] for rs in by_turn]
        row["cached_tokens_mean_by_turn"] = [_mean(c) for c in cached] if any(cached) else None
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        row["errors"] = errors[:5]
    return row


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def _mean_ms(values: list[float]) -> float | None:
    return round(1e3 * sum(values) / len(values), 2) if values else None


def steps_by_kind(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """{kind: {steps, mean_ms[, device_ms]}} from the engine's step counters of a level (e.g. how long the steps
    that prefilled a new prompt beside the decodes took against the decode steps; device_ms: the GPU's part of a
    decode step on CUDA, so that mean_ms - device_ms is the GPU waiting for the host)."""
    out: dict[str, dict[str, float]] = {}
    for name, steps in counters.items():
        if "engine_steps_total{" in name and steps > 0:
            kind = name[name.index("{") :]
            seconds = counters.get(name.replace("engine_steps_total", "engine_step_seconds_total"), 0.0)
            label = kind.split('"')[1] if '"' in kind else kind
            out[label] = {"steps": steps, "mean_ms": round(1e3 * seconds / steps, 2)}
            device = counters.get(name.replace("engine_steps_total", "engine_step_device_seconds_total"))
            if device:  # decode steps on CUDA: the GPU's share of the wall time
                out[label]["device_ms"] = round(1e3 * device / steps, 2)
    return out


def ttft_parts(counters: dict[str, float]) -> dict[str, float]:
    """Mean ms of the server's time to first token and of its parts over a level, from its histograms' sums and
    counts: `preprocess` (arrival to the prompt handed to the engine), `engine` (from there to the first token).
    What the client's TTFT adds on top is HTTP and the event loop. {} with a server that has no such histograms."""
    out = {}
    for label, name in (("server", "time_to_first_token_seconds"), ("preprocess", "request_preprocess_seconds"),
                        ("engine", "request_engine_first_token_seconds")):  # fmt: skip
        count = counters.get(f"{PREFIX}_{name}_count", 0.0)
        if count > 0:
            out[label] = round(1e3 * counters.get(f"{PREFIX}_{name}_sum", 0.0) / count, 2)
    return out


def format_row(r: dict) -> str:
    def ms(name: str) -> str:
        values = [r.get(f"{name}_ms_{s}") for s in ("mean", "p50", "p99")]
        return "/".join("-" if v is None else f"{v:.1f}" for v in values)

    rate = "inf" if r["request_rate"] is None else f"{r['request_rate']:g}"
    line = (
        f"conc {r['concurrency'] or 'inf':>4} rate {rate:>5}: {r['completed']}/{r['requests']} ok, "
        f"{r['request_throughput'] or 0:.2f} req/s, {r['output_tokens_per_s'] or 0:.1f} out tok/s, "
        f"in {r['mean_input_tokens'] or 0:.0f} out {r['mean_output_tokens'] or 0:.0f} tok/req | ms mean/p50/p99 "
        f"TTFT {ms('ttft')} TPOT {ms('tpot')} ITL {ms('itl')}"
    )
    if r.get("server_steps"):
        line += "\n    engine steps: " + ", ".join(
            f"{kind} {v['steps']:.0f} x {v['mean_ms']:.1f} ms"
            + (f" (GPU {v['device_ms']:.1f})" if v.get("device_ms") else "")
            for kind, v in r["server_steps"].items()
        )
    if parts := r.get("server_ttft_ms"):
        line += "\n    server TTFT ms mean: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
    if r.get("ttft_ms_mean_by_turn"):
        line += f"\n    TTFT ms by turn {r['ttft_ms_mean_by_turn']}"
        if r.get("cached_tokens_mean_by_turn"):
            line += f", cached tokens by turn {r['cached_tokens_mean_by_turn']}"
    return line
