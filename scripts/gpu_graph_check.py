"""Decode CUDA graphs on the GPU (26B-A4B shape, random NVFP4): the replayed step's logits equal the eager step's.

Three sequences of different lengths (padded to the graph of 4); the same decode step run eagerly and replayed.
"""

from __future__ import annotations

import torch

from nvfp4kit.config import load_preset
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model

cfg = load_preset("gemma-4-26b-a4b")
model = random_model(cfg, quantized=True, device="cuda")
engine = Engine(
    model, None,
    config=EngineConfig(kv_dtype="fp8_e5m2", max_num_seqs=4, max_num_batched_tokens=2048, num_kv_tokens=20_000,
                        graph_batch_sizes=(1, 4)),
)  # fmt: skip
gen = torch.Generator().manual_seed(0)
for n in (700, 1500, 40):
    engine.add_request(torch.randint(10, 200000, (n,), generator=gen).tolist(),
                       SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # fmt: skip
for _ in range(4):
    engine.step()
reqs = list(engine.scheduler.running)
with torch.inference_mode():
    for trial in range(3):
        ids = [r.all_ids[-1] for r in reqs]
        seqs = [SeqSlice(len(r.all_ids) - 1, 1, i, r.block_table, r.ring) for i, r in enumerate(reqs)]
        graph_logits = engine.graphs.run(ids, seqs).clone()
        ctx = BatchContext(model, engine.cache, seqs, model.device)
        eager = model.logits(model.hidden_states(torch.tensor(ids, device="cuda"), ctx))
        err = ((graph_logits - eager).abs().max() / eager.abs().max()).item()
        same = (graph_logits.argmax(-1) == eager.argmax(-1)).tolist()
        top2 = eager.topk(2, dim=-1).values
        print(f"step {trial}: max |graph - eager| / max|eager| = {err:.2e}; argmax equal {same}; "
              f"top-2 gap {(top2[:, 0] - top2[:, 1]).tolist()}")  # fmt: skip
        engine.step()
