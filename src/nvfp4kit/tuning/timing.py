"""GPU timing helpers: CUDA-graph replays, back-to-back launches, and the device's copy bandwidth.

Every timed call takes an index so it can rotate among several copies of its inputs: weights that fit in
L2 would otherwise be timed from cache, not from device memory.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

Call = Callable[[int], object]  # call(i): one launch of the op on input set i


@dataclass(frozen=True)
class Timing:
    graph_us: float  # median per call, CUDA graph of `calls` launches replayed
    eager_us: float  # median per call, `calls` launches back to back without a graph


def _median_event_us(run: Callable[[], None], *, repeats: int, per_run_calls: int) -> float:
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / per_run_calls)
    return statistics.median(samples)


def time_eager(call: Call, *, sets: int, calls: int = 20, repeats: int = 15) -> float:
    def run() -> None:
        for i in range(calls):
            call(i % sets)

    run()  # warm up (compiles, autotunes, allocates)
    torch.cuda.synchronize()
    return _median_event_us(run, repeats=repeats, per_run_calls=calls)


def time_graph(call: Call, *, sets: int, calls: int = 20, repeats: int = 15) -> float:
    for i in range(min(sets, 3)):  # warm up outside the capture
        call(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                call(i % sets)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    try:
        return _median_event_us(graph.replay, repeats=repeats, per_run_calls=calls)
    finally:
        del graph


def time_call(call: Call, *, sets: int, calls: int = 20, repeats: int = 15) -> Timing:
    return Timing(
        graph_us=time_graph(call, sets=sets, calls=calls, repeats=repeats),
        eager_us=time_eager(call, sets=sets, calls=calls, repeats=repeats),
    )


def copy_bandwidth_gbps(*, device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (GB/s, 1e9)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    us = _median_event_us(lambda: dst.copy_(src), repeats=20, per_run_calls=1)
    return 2 * nbytes / (us * 1e-6) / 1e9


def rotation_sets(bytes_per_set: int, *, l2_bytes: int, cap: int = 32) -> int:
    """How many input copies to rotate through so that one pass over them is at least 4x the L2 cache."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(cap, -(-4 * l2_bytes // bytes_per_set)))


def l2_cache_bytes(device: torch.device | str = "cuda") -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 1024 * 1024))
