"""The start-up warm-up's cost on the card: 26B-A4B random NVFP4, the serving limits of scripts/gpu_serve_bench.sh.

Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_warmup_cost.py
Two engines one after the other: the first compiles every variant into an empty Triton cache (a fresh install's
first start), the second reads them back from that cache (every later start). Prints each warm-up's report.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cold-"))

import torch  # noqa: E402

from nvfp4kit.config import load_preset  # noqa: E402
from nvfp4kit.engine.engine import Engine, EngineConfig  # noqa: E402
from nvfp4kit.testing.random_model import random_model  # noqa: E402

model = random_model(load_preset("gemma-4-26b-a4b"), quantized=True, device="cuda")
config = EngineConfig(
    kv_dtype="fp8_e4m3", max_model_len=16384, max_num_seqs=128, max_num_batched_tokens=2048, warmup=True
)
for run in ("cold Triton cache", "warm Triton cache"):
    engine = Engine(model, None, config=config)
    print(f"{torch.cuda.get_device_name()}, {run}: {engine.warmup}", flush=True)
    engine.close()
    del engine
    torch.cuda.empty_cache()
