"""Byte units: parse "24GiB" / "80GB" / "512MiB", and print sizes the way the plan tables do; token-count lists."""

from __future__ import annotations

import argparse
import re

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
KB, MB, GB = 10**3, 10**6, 10**9

_UNITS = {
    "": 1, "b": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40,
    "kb": KB, "mb": MB, "gb": GB, "tb": 10**12,
    "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")  # 24GiB, 22.5GB, 1.5e9


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776. GB/MB are decimal, GiB/MiB binary; a bare 'G' means GiB (as nvidia-smi counts).

    A bare number is bytes and may use an exponent ('1.5e9')."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def format_count(n: float) -> str:
    """12_345 -> '12.3K', 232_733 -> '232.7K', 1_234_567 -> '1.23M' (token counts in tables)."""
    if n >= 10**6:
        return f"{n / 10**6:.2f}M"
    if n >= 10**3:
        return f"{n / 10**3:.1f}K"
    return f"{n:.0f}"


def parse_size(value: int | float | str, *, option: str) -> int:
    """Bytes from 24GiB, 22.5GB, 24G, 1.5e9 or a number; the error names the option that held the junk."""
    if isinstance(value, bool):
        raise ValueError(f"{option}: expected a size such as 24GiB, got {value!r}")
    if isinstance(value, int | float):
        size = int(value)
    else:
        try:
            size = parse_bytes(str(value))
        except ValueError:
            raise ValueError(
                f"{option}: cannot read {value!r} as a size; write e.g. 24GiB, 22.5GB, 24G or 1.5e9"
            ) from None
    if size <= 0:
        raise ValueError(f"{option}: must be a positive size, got {value!r}")
    return size


def token_counts(text: str) -> tuple[int, ...]:
    """argparse type of `--prefill-graphs` (serve, bench engine): `1024,2048` -> (1024, 2048); `none` -> ()."""
    if text.strip().lower() in ("0", "none", "off"):
        return ()
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts like 512,1024,2048, got {text!r}") from None
    if not counts or min(counts) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive token counts like 512,1024,2048, got {text!r}")
    return counts
