"""Collect the `bench serve` JSON files of `scripts/gpu_serve_bench.sh` into one result file and print its table.

    python3 scripts/gpu_serve_report.py OUT.json ROWS_DIR --card nvidia-h200 --server "serve ..." [--quiet]

Each ROWS_DIR/<name>.json is one `nvfp4kit bench serve --json` file (c1, c100, n4, turns_cached,
turns_uncached); missing ones (a step that failed or did not run) are left out. Beside it, <name>.compiles.json
and <name>.compiles_before.json hold the server's Triton compile counters (/metrics) after and before the level,
and server_<name>.txt the server's start-up lines (warm-up, CUDA graphs). The table gives per level output tok/s,
latencies and the kernels compiled during the level after the warm-up (each stalled every stream), per turn the
TTFT with and without the prefix cache (and their ratio, with the mean from the second turn on against the
issue's 0.25), and for n=4 the prompt tokens the model computed (`nvfp4kit_prefill_tokens_total`) per request.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

ORDER = ("c1", "c100", "n4", "turns_cached", "turns_uncached")


AFTER_WARMUP = "kernel_compiles_after_warmup_total"


def collect(rows_dir: Path) -> dict[str, dict]:
    found = {}
    for name in ORDER:
        file = rows_dir / f"{name}.json"
        if file.is_file():
            found[name] = json.loads(file.read_text())
            found[name]["kernel_compiles"] = {
                "before": _read_json(rows_dir / f"{name}.compiles_before.json"),
                "after": _read_json(rows_dir / f"{name}.compiles.json"),
            }
    return found


def servers(rows_dir: Path) -> dict[str, list[str]]:
    """Each server's start-up lines (`server_<name>.txt`: the warm-up's steps, compiles and seconds)."""
    return {
        file.stem.removeprefix("server_"): [
            line.strip() for line in file.read_text().splitlines() if line.strip()
        ]
        for file in sorted(rows_dir.glob("server_*.txt"))
    }


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except json.JSONDecodeError:
        return {}


def level_compiles(run: dict) -> str:
    """Kernel variants compiled during the level after the warm-up ('-': the counters were not read)."""
    counts = run.get("kernel_compiles") or {}
    after, before = counts.get("after", {}).get(AFTER_WARMUP), counts.get("before", {}).get(AFTER_WARMUP)
    if after is None:
        return "-"
    return f"{after - (before or 0):.0f}"


def turn_ratio(on: list, off: list) -> tuple[float, float] | None:
    """Mean TTFT (ms) from the second turn on with the cache and without it, over the turns both measured."""
    pairs = [(a, b) for a, b in zip(on[1:], off[1:]) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)


def _ms(row: dict, name: str) -> str:
    values = [row.get(f"{name}_ms_{s}") for s in ("mean", "p50", "p99")]
    return "/".join("-" if v is None else f"{v:.1f}" for v in values)


def _server_ttft(row: dict) -> str:
    """The server's mean TTFT as its two parts (what the client's TTFT adds on top is HTTP and streaming)."""
    parts = row.get("server_ttft_ms") or {}
    if "preprocess" not in parts or "engine" not in parts:
        return "-"
    return f"{parts['preprocess']:.1f} + {parts['engine']:.1f}"


def table(runs: dict[str, dict]) -> list[str]:
    lines = [
        "| level | ok | out tok/s | in/out tok per req | TTFT ms mean/p50/p99 | server TTFT ms: preprocess + engine "
        "| TPOT ms mean/p50/p99 | ITL ms p50/p99 | compiles after warm-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for row in run["rows"]:
            label = f"{name} (n={run['workload']['n']})" if run["workload"]["n"] > 1 else name
            lines.append(
                f"| {label} conc {row['concurrency'] or 'inf'} | {row['completed']}/{row['requests']} | "
                f"{row['output_tokens_per_s'] or 0:,.1f} | {row['mean_input_tokens'] or 0:.0f}/"
                f"{row['mean_output_tokens'] or 0:.0f} | {_ms(row, 'ttft')} | {_server_ttft(row)} | {_ms(row, 'tpot')} | "
                f"{row.get('itl_ms_p50') or 0:.1f}/{row.get('itl_ms_p99') or 0:.1f} | {level_compiles(run)} |"
            )
    for name in ("c1", "c100"):
        if name in runs:
            lines += [line for row in runs[name]["rows"] if (line := engine_time(name, row))]
    n4 = runs.get("n4")
    if n4 and n4["rows"][0].get("server_counters"):
        row = n4["rows"][0]
        counters = row["server_counters"]
        prefill = counters.get("nvfp4kit_prefill_tokens_total")
        prompt = counters.get("nvfp4kit_prompt_tokens_total")
        if prefill is not None and prompt:
            lines.append(
                f"n=4: {prompt:.0f} prompt tokens in {row['completed']} requests, {prefill:.0f} computed by the "
                f"model ({prefill / prompt:.2f} prefills per prompt; 4.00 = no sharing)"
            )
    cached, uncached = runs.get("turns_cached"), runs.get("turns_uncached")
    if cached:
        on = cached["rows"][0].get("ttft_ms_mean_by_turn") or []
        off = (uncached["rows"][0].get("ttft_ms_mean_by_turn") or []) if uncached else []
        hits = cached["rows"][0].get("cached_tokens_mean_by_turn") or []
        sent = cached["rows"][0].get("input_tokens_mean_by_turn") or []
        lines.append("| turn | prompt tokens | cached tokens | TTFT ms cache | TTFT ms no cache | ratio |")
        lines.append("|---|---|---|---|---|---|")
        for t, ttft in enumerate(on):
            base = off[t] if t < len(off) else None
            ratio = f"{ttft / base:.2f}" if ttft and base else "-"
            lines.append(
                f"| {t + 1} | {_at(sent, t)} | {_at(hits, t)} | {_at(on, t, '.1f')} | {_at(off, t, '.1f')} | {ratio} |"
            )
        means = turn_ratio(on, off)
        if means is not None:
            worst = max(a / b for a, b in zip(on[1:], off[1:]) if a and b)
            lines.append(
                f"turns 2-{len(on)}: mean TTFT {means[0]:.1f} ms with the prefix cache, {means[1]:.1f} ms without "
                f"({means[0] / means[1]:.2f}x, worst turn {worst:.2f}x; target <= 0.25)"
            )
        elif not uncached:
            lines.append("no run without the prefix cache: the multi-turn comparison is missing")
    return lines


def engine_time(name: str, row: dict) -> str | None:
    """Where a throughput level's wall time went in the engine: its decode steps (rows on average: how full the
    batch ran, ramp and tail included) and the steps that prefilled (a level's prompts cost these in full)."""
    steps, counters = row.get("server_steps") or {}, row.get("server_counters") or {}
    decode = [v for k, v in steps.items() if k.startswith("decode")]
    prefill = [v for k, v in steps.items() if k.startswith("prefill")]
    if not decode or not row.get("duration_s"):
        return None
    n_decode = sum(v["steps"] for v in decode)
    decode_s = sum(v["steps"] * v["mean_ms"] for v in decode) / 1e3
    prefill_s = sum(v["steps"] * v["mean_ms"] for v in prefill) / 1e3
    # every request's first token comes from the step that prefilled it; the rest from decode steps
    rows = (counters.get("nvfp4kit_generation_tokens_total", 0.0) - row["completed"]) / n_decode
    prompt = counters.get("nvfp4kit_prefill_tokens_total", 0.0)
    rate = f", {prompt / prefill_s:,.0f} prompt tokens a second" if prefill_s and prompt else ""
    return (
        f"{name}: {row['duration_s']:.1f} s; decode {n_decode:.0f} steps x {decode_s / n_decode * 1e3:.2f} ms at "
        f"{rows:.1f} rows on average ({decode_s:.1f} s); steps that prefilled "
        f"{sum(v['steps'] for v in prefill):.0f} ({prefill_s:.1f} s{rate})"
    )


def _at(values: list, index: int, spec: str = ".0f") -> str:
    return "-" if index >= len(values) or values[index] is None else f"{values[index]:{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("rows_dir")
    parser.add_argument("--card", required=True)
    parser.add_argument("--server", default="")
    parser.add_argument("--quiet", action="store_true", help="write the file, print nothing")
    args = parser.parse_args()
    runs = collect(Path(args.rows_dir))
    started = servers(Path(args.rows_dir))
    result = {
        "date": datetime.date.today().isoformat(),
        "card": args.card,
        "server": args.server,
        "command": "bash scripts/gpu_serve_bench.sh OUT",
        "runs": runs,
        "servers": started,
        "table": table(runs)
        + [f"server {name}: {line}" for name, lines in started.items() for line in lines],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.quiet:
        print("\n".join(result["table"]))


if __name__ == "__main__":
    main()
