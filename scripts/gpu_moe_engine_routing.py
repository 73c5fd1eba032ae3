"""The MoE layer on the routing the engine really produces at a decode batch, against uniform random routing.

Session 21 (H100): at 64 tokens the expert-grouped fragment MoE with two tiles beat the tuned tiles by 1.06-1.12x
under `scripts/gpu_moe_grouped_probe.py`'s uniform routing, yet raising the grouped limit to 64 made the engine's
batch-64 decode 0.7-3% slower. One suspect is the routing: an expert with more than 8 pairs is read again for each
further block of 8. This runs one eager decode step of the random 26B-A4B engine at `--batch` sequences, records
every MoE layer's inputs (tokens, top-k ids and weights), prints how the pairs spread over experts (most pairs on
one expert, blocks of 8 and 16 that the sort makes, against uniform routing of the same size) and, on a GPU, times
the engine's `fused_moe` and the grouped kernels (blocks of 8 / 16, one / two tiles) on
those exact inputs and on uniform routing, each layer's own experts, rotated over the recorded layers.
Session 22 (H100, batch 64): the engine's routing spreads like uniform routing (at most 9-11 pairs on an expert,
124-126 experts touched) and the grouped kernels win on it as on uniform routing (227.6 us against the tiles'
256.6): the engine's loss came from the dense MLP running beside them (path_limits.GROUPED_ALONE_TOKENS).
  PYTHONPATH=src python3 scripts/gpu_moe_engine_routing.py [--batch 64] [--layers 6] [--json OUT]
  (on a CPU: `--tiny` runs the tiny test model and prints the spread only)
"""

from __future__ import annotations

import argparse
import json

import torch

from nvfp4kit.bench import engine_runs as runs
from nvfp4kit.config import config_from_dict, load_preset
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.gemma4 import Experts
from nvfp4kit.model.layers import stored_weight
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny_config import tiny_text_config
from nvfp4kit.tuning.cases import random_routing

GROUPED = {"grouped b8 t11": (8, (1, 1)), "grouped b8 t22": (8, (2, 2)), "grouped b16 t22": (16, (2, 2))}


def record_moe_inputs(engine: Engine, batch: int, context: int) -> list[dict]:
    """Every MoE layer's (x, ids, weights, gate_up, down) in one eager decode step of `batch` sequences."""
    # no sequence may finish while the others prefill: the recorded step must decode all `batch` of them
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    for b in range(batch):
        engine.add_request(runs.random_prompt(engine.model.config, context, seed=b), params)
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()
    records: list[dict] = []
    forward = Experts.forward

    def keep(self, x, weights, ids):
        if x.shape[0] == batch:
            records.append({"x": x.clone(), "ids": ids.clone(), "weights": weights.clone(), "module": self})
        return forward(self, x, weights, ids)

    Experts.forward = keep
    try:
        engine.step()
    finally:
        Experts.forward = forward
    return records


def spread(ids: torch.Tensor, experts: int) -> dict:
    """How a routing's pairs fall on experts: the most on one, and the blocks of 8 and 16 a sort by expert makes."""
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=experts)
    return {
        "max_pairs": int(counts.max()),
        "experts_touched": int((counts > 0).sum()),
        "blocks_of_8": int(((counts + 7) // 8).sum()),
        "blocks_of_16": int(((counts + 15) // 16).sum()),
    }


def time_paths(records: list[dict], uniform: list[torch.Tensor]) -> dict:
    from nvfp4kit.kernels.fused_moe import fused_moe
    from nvfp4kit.kernels.moe_frag_grouped import fused_moe_grouped
    from nvfp4kit.model.ops import TorchBackend
    from nvfp4kit.tuning.cases import rel_error
    from nvfp4kit.tuning.timing import time_graph

    weights = [(stored_weight(r["module"], "gate_up"), stored_weight(r["module"], "down")) for r in records]
    n = len(records)
    out: dict = {}
    for routing, id_sets in (("engine", [r["ids"] for r in records]), ("uniform", uniform)):

        def call(path: str, i: int, id_sets=id_sets):
            r, (gu, dn) = records[i % n], weights[i % n]
            ids = id_sets[i % n]
            if path == "fused_moe (engine)":
                return fused_moe(r["x"], ids, r["weights"], gu, dn)
            block, tiles = GROUPED[path]
            return fused_moe_grouped(r["x"], ids, r["weights"], gu, dn, block=block, tiles=tiles)

        ref = TorchBackend().moe(
            records[0]["x"].float(), id_sets[0], records[0]["weights"].float(), *weights[0]
        )
        for path in ["fused_moe (engine)", *GROUPED]:
            err = rel_error(call(path, 0), ref)
            key = f"{routing}: {path}"
            out[key] = time_graph(lambda i, p=path: call(p, i), sets=n) if err < 2e-2 else f"error {err:.1e}"
            print(f"{key}: {out[key]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6, help="recorded MoE layers timed (rotated)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU): the spread only")
    ap.add_argument("--json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    cfg = config_from_dict(tiny_text_config("moe")) if args.tiny else load_preset("gemma-4-26b-a4b")
    device = "cuda" if cuda else "cpu"
    model = random_model(cfg, quantized=True, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    config = EngineConfig(
        kv_dtype="fp8_e5m2" if cuda else "auto", max_num_seqs=args.batch, max_num_batched_tokens=2048,
        num_kv_tokens=args.batch * (args.context + 8) + 4096, prefix_caching=False, cuda_graphs=False,
        prefill_graphs=(),  # eager: a captured step would never call Experts.forward
    )  # fmt: skip
    engine = Engine(model, None, config=config)
    records = record_moe_inputs(engine, args.batch, args.context)
    engine.close()
    experts = cfg.num_experts
    # the probes' routing (`tuning.cases.random_routing`: every token's k experts uniformly at random, distinct)
    uniform = [
        random_routing(r["ids"].shape[0], experts, r["ids"].shape[1], device=device, seed=i)[0].to(
            r["ids"].dtype
        )
        for i, r in enumerate(records)
    ]
    rows = [{"layer": i, "engine": spread(r["ids"], experts), "uniform": spread(u, experts)}
            for i, (r, u) in enumerate(zip(records, uniform))]  # fmt: skip
    print(
        f"{len(records)} MoE layers at {args.batch} tokens, {experts} experts, top-{records[0]['ids'].shape[1]}"
    )
    print("| layer | most pairs on an expert (uniform) | experts touched | blocks of 8 | blocks of 16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        e, u = r["engine"], r["uniform"]
        print(f"| {r['layer']} | {e['max_pairs']} ({u['max_pairs']}) | {e['experts_touched']} ({u['experts_touched']}) "
              f"| {e['blocks_of_8']} ({u['blocks_of_8']}) | {e['blocks_of_16']} ({u['blocks_of_16']}) |")  # fmt: skip
    result: dict = {"batch": args.batch, "layers": rows}
    if cuda:
        picked = list(range(0, len(records), max(1, len(records) // args.layers)))[: args.layers]
        result["card"] = torch.cuda.get_device_name()
        result["us"] = time_paths([records[i] for i in picked], [uniform[i] for i in picked])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
