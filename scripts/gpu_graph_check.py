"""Decode CUDA graphs on the GPU: greedy tokens equal eager, and decode speed eager vs graphs (26B-A4B shape)."""

from __future__ import annotations

import logging
import sys
import time

import torch

from nvfp4kit.config import load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model

logging.basicConfig(level=logging.INFO, stream=sys.stderr)


def run(engine, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    out = [[] for _ in prompts]
    while engine.has_unfinished():
        for e in engine.step():
            out[ids[e.request_id]].append(e.token_id)
    return out


def decode_tps(engine, batch, steps=32, prompt_len=512):
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    for b in range(batch):
        engine.add_request([10 + (b * 7 + i) % 5000 for i in range(prompt_len)], params)
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return batch * steps / dt, 1e3 * dt / steps


cfg = load_preset("gemma-4-26b-a4b")
model = random_model(cfg, quantized=True, device="cuda")
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(10, 200000, (n,), generator=gen).tolist() for n in (700, 1500, 40)]
base = dict(kv_dtype="fp8_e5m2", max_num_seqs=64, max_num_batched_tokens=2048, num_kv_tokens=200_000)
rows = []
outs = {}
for graphs in (False, True):
    t0 = time.perf_counter()
    engine = Engine(model, None, config=EngineConfig(cuda_graphs=graphs, **base))
    print(f"engine init (graphs={graphs}) {time.perf_counter() - t0:.1f}s", flush=True)
    outs[graphs] = run(engine, prompts, 24)
    for batch in (1, 16, 64):
        tps, ms = decode_tps(engine, batch, steps=16 if not graphs else 48)
        rows.append((graphs, batch, tps, ms))
        print(rows[-1], flush=True)
    del engine
    torch.cuda.empty_cache()
same = [a == b for a, b in zip(outs[False], outs[True])]
agree = [sum(x == y for x, y in zip(a, b)) for a, b in zip(outs[False], outs[True])]
print("greedy tokens eager == graphs:", same, "agreeing tokens of 24:", agree)
print(f"{'mode':8} {'batch':>5} {'tok/s':>9} {'ms/step':>8}")
for graphs, batch, tps, ms in rows:
    print(f"{'graphs' if graphs else 'eager':8} {batch:5} {tps:9.1f} {ms:8.2f}")
