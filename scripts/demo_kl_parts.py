"""Where the KL of an NVFP4 export comes from: the BF16 demo model with only one part's linears replaced by the
export's dequantized weights (`--mode alone`), or the export with only that part put back to BF16 (`--mode
without`), scored against the BF16 model as `scripts/demo_accuracy.py` scores a whole export (same 64 held-out
windows of 512 tokens, reference logits computed once). Quantize once, evaluate many times:

    # make the exports once (max and gptq, as demo_accuracy makes them; --cache keeps them)
    python scripts/demo_accuracy.py --only all-nvfp4-max all-nvfp4-gptq --device cpu --cache /tmp/klparts/exports
    # then score parts of each (about a minute a part on one CPU thread)
    python scripts/demo_kl_parts.py /tmp/klparts/exports/all-nvfp4-max /tmp/klparts/exports/all-nvfp4-gptq
    python scripts/demo_kl_parts.py EXPORT --parts attn_sliding attn_global mlp experts layer0 all --mode without

Parts: attn_sliding (q/k/v/o of the sliding layers), attn_global (q/k/v/o of the full-attention layers), mlp (dense
gate/up/down of all layers), experts (all experts of all layers), layerN (every linear of decoder layer N), qkv,
o, mlp_gate_up, mlp_down, experts_gate_up, experts_down (those projections of all layers), q, k, v (those rows
of the fused q/k/v projections; the global layer has no v), PART@N (PART's
linears in layer N only, e.g. qkv@0), all (every quantized linear: equals scoring the export itself, a check). Only
the NVFP4 linears' weights are swapped; norms, router and embeddings stay the BF16 model's (checked equal to the
export's unless `--keep-other` is given, which takes them from the export too). Prints one JSON row per part.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from nvfp4kit.demo import demo_model_path  # noqa: E402
from nvfp4kit.eval import ReferenceLogits, load_samples  # noqa: E402
from nvfp4kit.model.layers import stored_weight  # noqa: E402
from nvfp4kit.model.loader import load_model  # noqa: E402
from nvfp4kit.tokenizer import Tokenizer  # noqa: E402

LINEARS = (  # (module path inside a decoder layer, weight name, kind, sub-kind)
    ("self_attn.qkv_proj", "weight", "qkv", "qkv"),
    ("self_attn.o_proj", "weight", "o", "o"),
    ("mlp.gate_up_proj", "weight", "mlp", "mlp_gate_up"),
    ("mlp.down_proj", "weight", "mlp", "mlp_down"),
    ("experts", "gate_up", "experts", "experts_gate_up"),
    ("experts", "down", "experts", "experts_down"),
)


def select(part: str, model) -> dict[tuple[int, str, str], slice]:
    """{(layer, module path, weight name): output rows} of every linear in `part`; `PART@N`: layer N's only."""
    if "@" in part:
        part, only = part.split("@")
        return {c: rows for c, rows in select(part, model).items() if c[0] == int(only)}
    chosen = {}
    for i, kind_of_layer in enumerate(model.config.layer_types):
        for path, name, kind, sub in LINEARS:
            attn = kind in ("qkv", "o")
            rows = slice(None)
            take = {
                "all": True,
                "attn_sliding": attn and kind_of_layer == "sliding_attention",
                "attn_global": attn and kind_of_layer != "sliding_attention",
                "attn": attn,
                "qkv": kind == "qkv",
                "o": kind == "o",
                "mlp": kind == "mlp",
                "experts": kind == "experts",
                "mlp_gate_up": sub == "mlp_gate_up",
                "mlp_down": sub == "mlp_down",
                "experts_gate_up": sub == "experts_gate_up",
                "experts_down": sub == "experts_down",
            }.get(part)
            if take is None and part.startswith("layer"):
                take = i == int(part[5:])
            if take is None and part in ("q", "k", "v"):  # rows of the fused q/k/v projection
                splits = model.layers[i].self_attn.qkv_proj.splits
                which = "qkv".index(part)
                take = kind == "qkv" and which < len(splits)
                if take:
                    rows = slice(sum(splits[:which]), sum(splits[: which + 1]))
            if take is None:
                raise SystemExit(f"unknown part {part!r}")
            if take:
                chosen[(i, path, name)] = rows
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("exports", nargs="+", help="NVFP4 export folders (ModelOpt format)")
    parser.add_argument("--parts", nargs="+",
                        default=["attn_sliding", "attn_global", "mlp", "experts",
                                 *(f"layer{i}" for i in range(6)), "all"])  # fmt: skip
    parser.add_argument("--mode", choices=("alone", "without"), default="alone",
                        help="alone: only the part NVFP4; without: everything NVFP4 but the part")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--keep-other", action="store_true", help="also take norms/router from the export")
    args = parser.parse_args()
    bf16 = demo_model_path("bf16")
    samples = load_samples(None, Tokenizer(bf16), num_samples=args.num_samples, seq_len=args.seq_len)
    model = load_model(bf16, dtype=torch.float32, device="cpu")
    original = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="nvfp4kit-klparts-") as tmp:
        t0 = time.time()
        reference = ReferenceLogits(model, samples, folder=tmp)
        print(f"reference logits: {time.time() - t0:.0f}s", flush=True)
        for export in args.exports:
            quant = load_model(export, dtype=torch.float32, device="cpu")
            dense = {}  # (layer, path, name) -> the export's weight, dequantized to fp32
            for i, path, name in select("all", model):
                module = quant.layers[i].get_submodule(path)
                w = stored_weight(module, name)
                dense[(i, path, name)] = (
                    w.dequantize(torch.float32) if hasattr(w, "dequantize") else w.float()
                )
            other = {k: v for k, v in quant.state_dict().items() if v is not None and k in original
                     and v.dtype == original[k].dtype and v.shape == original[k].shape}  # fmt: skip
            differ = [k for k, v in other.items() if not torch.equal(v, original[k])]
            print(
                json.dumps({"export": str(export), "non_linear_tensors_differing_from_bf16": differ}),
                flush=True,
            )
            del quant
            for part in args.parts:
                t0 = time.time()
                model.load_state_dict(original, strict=False)
                if args.keep_other:
                    model.load_state_dict(other, strict=False)
                chosen = select(part, model)
                swapped = 0
                with torch.no_grad():
                    for (i, path, name), new in dense.items():
                        mask = torch.zeros(new.shape[-2], dtype=torch.bool)
                        if (i, path, name) in chosen:
                            mask[chosen[(i, path, name)]] = True
                        if args.mode == "without":
                            mask = ~mask
                        if mask.any():
                            getattr(model.layers[i].get_submodule(path), name)[..., mask, :] = new[
                                ..., mask, :
                            ]
                            swapped += 1
                result = reference.score(model)
                row = {"export": Path(export).name, "mode": args.mode, "part": part, "linears": swapped,
                       "kl_mean": round(result.kl_mean, 5), "kl_p99": round(result.kl_p99, 4),
                       "top1_agreement": round(result.top1_agreement, 4), "ppl": round(result.ppl_quant, 3),
                       "seconds": round(time.time() - t0)}  # fmt: skip
                print(json.dumps(row), flush=True)
        model.load_state_dict(original, strict=False)


if __name__ == "__main__":
    main()
