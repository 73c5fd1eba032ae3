"""Decode CUDA graphs on the GPU (26B-A4B shape, random NVFP4): a replay computes what the same step does eagerly.

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_graph_check.py [--tiny]
Three sequences of different lengths, padded to the graph of 4. The replay is compared with the same padded step
run eagerly (same metadata, same launches: must agree to bf16 noise) and, for information, with a plain eager step
(different key splits and M: random weights route near-ties differently, so logits may differ a lot while the
argmax usually agrees). Also checks that padding rows stay finite.
"""

from __future__ import annotations

import sys

import torch

from nvfp4kit.config import load_preset
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice
from nvfp4kit.engine.cuda_graphs import DecodeGraphs
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


if (
    "--tiny" in sys.argv
):  # a quick check of the same paths on the tiny MoE shape (seconds instead of a minute)
    from nvfp4kit.config import config_from_dict
    from nvfp4kit.testing.tiny_config import tiny_text_config

    cfg = config_from_dict(tiny_text_config("moe"))
else:
    cfg = load_preset("gemma-4-26b-a4b")
model = random_model(cfg, quantized=True, device="cuda")
config = EngineConfig(
    kv_dtype="fp8_e5m2",
    max_num_seqs=4,
    max_num_batched_tokens=2048,
    num_kv_tokens=20_000,
    graph_batch_sizes=(1, 4),
)
engine = Engine(model, None, config=config)
eager_graphs = DecodeGraphs(
    model, engine.cache, batch_sizes=(4,), max_model_len=engine.max_model_len, eager=True
)
eager_graphs.capture()
gen = torch.Generator().manual_seed(0)
for n in (700, 1500, 40):
    engine.add_request(
        torch.randint(10, cfg.vocab_size, (n,), generator=gen).tolist(),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    )
for _ in range(4):
    engine.step()
reqs = list(engine.scheduler.running)
worst = 0.0
with torch.inference_mode():
    for trial in range(3):
        ids = [r.all_ids[-2] for r in reqs]  # recompute the last cached position (its block exists)
        seqs = [SeqSlice(len(r.all_ids) - 2, 1, i, r.block_table, r.ring) for i, r in enumerate(reqs)]
        replay = engine.graphs.run(ids, seqs).clone()
        same_launches = eager_graphs.run(ids, seqs)
        ctx = BatchContext(model, engine.cache, seqs, model.device)
        plain = model.logits(model.hidden_states(torch.tensor(ids, device="cuda"), ctx))
        worst = max(worst, rel(replay, same_launches))
        print(
            f"step {trial}: replay vs same launches eager {rel(replay, same_launches):.1e}; "
            f"vs plain eager {rel(replay, plain):.1e}, argmax equal {(replay.argmax(-1) == plain.argmax(-1)).tolist()}; "
            f"finite {bool(torch.isfinite(engine.graphs._graphs[4].logits).all())}"
        )
        engine.step()
print(f"graph replay == eager at the same launches: {'PASS' if worst < 1e-2 else 'FAIL'} (worst {worst:.1e})")
