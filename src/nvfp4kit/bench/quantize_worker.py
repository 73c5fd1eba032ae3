"""One `nvfp4kit bench quantize` run in its own process (peak RSS and GPU memory are then that run's alone).

    python -m nvfp4kit.bench.quantize_worker SRC OUT METHOD DEVICE NUM_SAMPLES SEQ_LEN ASYMMETRIC

Prints one line `RESULT {json}`: wall seconds, peak RSS and GPU memory, and the refine pass's stages (statistics
forwards, the solve, the final forward, writing), timed by wrapping those functions for this process only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch


def _timed(stages: dict[str, float], cuda: bool, key_of: Callable, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            key = key_of(args, kwargs)
            stages[key] = stages.get(key, 0.0) + time.perf_counter() - started

    return wrapper


def main(argv: list[str]) -> None:
    import nvfp4kit.quant.pipeline as pipeline
    from nvfp4kit.quant import calib_layer, calib_refine, quantize, shard_writer

    src, out, method, device, samples, seq_len, asymmetric = argv
    cuda = device.startswith("cuda")
    stages: dict[str, float] = {}
    calib_refine.run_layer = _timed(
        stages,
        cuda,
        lambda a, k: "stats forwards" if k.get("record") else "final forward",
        calib_refine.run_layer,
    )
    calib_layer.LayerRefiner.refine = _timed(
        stages, cuda, lambda a, k: "solve", calib_layer.LayerRefiner.refine
    )
    shard_writer.ShardedWriter.add = _timed(
        stages, cuda, lambda a, k: "write", shard_writer.ShardedWriter.add
    )
    pipeline.refine_checkpoint = _timed(stages, cuda, lambda a, k: "refine pass", pipeline.refine_checkpoint)
    started = time.perf_counter()
    report = quantize(
        src, out, calibration=method, device=device, num_samples=int(samples), seq_len=int(seq_len),
        progress=False, overwrite=True, asymmetric={"on": True, "off": False}.get(asymmetric),
    )  # fmt: skip
    wall = time.perf_counter() - started
    result = {
        "seconds": round(wall, 2),
        "peak_rss_gib": round(report.peak_rss_bytes / 2**30, 2),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
        "stages": {k: round(v, 2) for k, v in stages.items()},
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
