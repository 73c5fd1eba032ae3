"""Result rows of the kernel benchmark and their plain-text table."""

from __future__ import annotations

from nvfp4kit.kernels.configs import config_to_dict
from nvfp4kit.tuning.timing import Timing

COLUMNS = (
    ("op", "{:<18}"),
    ("M", "{:>5}"),
    ("us", "{:>9.1f}"),
    ("us_eager", "{:>9.1f}"),
    ("gbps", "{:>7.0f}"),
    ("pct_copy_bw", "{:>6.1f}"),
    ("tflops", "{:>7.1f}"),
    ("bf16_us", "{:>9.1f}"),
    ("speedup", "{:>7.2f}"),
    ("heuristic_us", "{:>9.1f}"),
    ("path", "{:>8}"),  # what ran by default: frag, grouped, dot, gemv, dequant, prefill, tiles, or tuned
)


def row_for(op, shape, m, timing: Timing, base: Timing, case, copy_gbps: float, error: float, config) -> dict:
    """One JSON row: times in us, bandwidth on the bytes the op must move, FLOP rate, the BF16 cuBLAS time."""
    us = timing.graph_us
    gbps = case.bytes / us / 1e3
    return {
        "op": op,
        "shape": shape,
        "M": m,
        "us": round(us, 2),
        "us_eager": round(timing.eager_us, 2),
        "gbps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "tflops": round(case.flops / us / 1e6, 2),
        "bf16_us": round(base.graph_us, 2),
        "bf16_us_eager": round(base.eager_us, 2),
        "bf16_gbps": round(case.bf16_bytes / base.graph_us / 1e3, 1),
        "rel_error": float(f"{error:.3g}"),
        "config": None if config is None else config_to_dict(config),
    }


def format_table(rows: list[dict], *, header: bool = True) -> str:
    lines = []
    if header:
        lines.append(
            " ".join(
                f"{name:>{len(fmt.format(0) if name != 'op' else fmt.format(''))}}" for name, fmt in COLUMNS
            )
        )
    for row in rows:
        values = dict(
            row, speedup=row["bf16_us"] / row["us"] if row.get("us") else 0.0, path=row.get("path", "-")
        )
        lines.append(" ".join(fmt.format(values.get(name, 0)) for name, fmt in COLUMNS))
    return "\n".join(lines)
