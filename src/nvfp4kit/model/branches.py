"""Two independent halves of a layer on two CUDA streams: the dense MLP beside the experts.

A Gemma 4 MoE layer's dense MLP and its experts read different normed copies of the same residual and meet
again only in the layer's tail, so they may run at the same time (the router runs before the fork, in the
layer's `ffn_inputs_routed` region). At decode sizes each of their kernels is
latency-bound (a few microseconds of ramp-up and tail for a few MB of weights), so running the two chains side
by side fills SMs that one chain alone leaves idle. Stream capture records the fork and join as two parallel
branches of the CUDA graph, so replays overlap too. A MoE whose kernels fill the card (the expert-grouped ones
above 32 tokens) slows down with the MLP beside it: the layer's `overlap` check says so then (`Experts.shares_gpu`).

The side stream forks from the current one (waits for everything before) and the current one waits for it
before the tail: the memory of every tensor crossing the fork stays valid because its last use is ordered
before the next fork. Kernels that keep per-device state must keep a second copy for the side stream
(`kernels/split_k.py` asks `on_side_stream`). Prefill-sized steps stay on one stream: their linears share one
scratch buffer per device (`kernels/dequant.py`) and are compute-bound, where overlap gains little.

`NVFP4KIT_BRANCH_STREAMS=0` (or `set_branch_streams(False)`) keeps everything on one stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")

# tokens up to which the two halves overlap (below the linears' dequantize-then-cuBLAS threshold, 512)
MAX_OVERLAP_TOKENS = 256

_override: bool | None = None
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def set_branch_streams(enabled: bool | None) -> None:
    """Force the two-stream layer halves on or off in this process; None goes back to the environment."""
    global _override
    _override = enabled


def branch_streams_enabled() -> bool:
    if _override is not None:
        return _override
    return os.environ.get("NVFP4KIT_BRANCH_STREAMS", "1").strip().lower() not in ("0", "off", "false", "no")


def _indexed(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    device = _indexed(device)
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


def on_side_stream(device: torch.device) -> bool:
    """Whether kernels launched now on `device` go to the side stream (state they share must not be the main
    stream's). Keyed by role, not by stream: graph capture runs the main half on a capture stream of its own."""
    side = _side_streams.get(_indexed(device))
    return side is not None and torch.cuda.current_stream(device).cuda_stream == side.cuda_stream


def side_by_side(
    x: torch.Tensor,
    side: Callable[[], A],
    main: Callable[[], B],
    *,
    overlap: Callable[[], bool] | None = None,
) -> tuple[A, B]:
    """(side(), main()): on CUDA with few tokens `side` runs on a second stream while `main` runs on this one;
    otherwise (or when `overlap()`, asked only then, says no: `main` fills the card) one after the other. `x` is a
    tensor both read (it names the device and the token count)."""
    fits = x.is_cuda and x.shape[0] <= MAX_OVERLAP_TOKENS and branch_streams_enabled()
    if not (fits and (overlap is None or overlap())):
        return side(), main()
    current = torch.cuda.current_stream(x.device)
    stream = _side_stream(x.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        a = side()
    b = main()
    current.wait_stream(stream)
    return a, b
