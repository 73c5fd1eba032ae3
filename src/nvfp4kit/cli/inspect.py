"""`nvfp4kit inspect`: what a checkpoint holds, from its headers only (no tensor data is read)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print architecture, parameters by component, dtypes, quantization and file sizes of a "
        "checkpoint, reading only config files and safetensors headers."
    )
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(folder: Path) -> dict:
    from nvfp4kit.config import load_config
    from nvfp4kit.formats.components import component_sizes
    from nvfp4kit.formats.safetensors_io import CheckpointReader

    cfg = load_config(folder)
    reader = CheckpointReader(folder)
    sizes = component_sizes(reader.tensors.values())
    raw = json.loads((folder / "config.json").read_text())
    quant = raw.get("quantization_config")
    hf_quant = folder / "hf_quant_config.json"
    if hf_quant.is_file():
        quant = json.loads(hf_quant.read_text()).get("quantization", quant)
    files = sorted({t.file for t in reader.tensors.values()})
    return {
        "architecture": raw.get("architectures", [raw.get("model_type")]),
        "model_type": raw.get("model_type"),
        "layers": cfg.num_hidden_layers,
        "sliding_layers": cfg.num_sliding_layers,
        "global_layers": cfg.num_full_layers,
        "hidden_size": cfg.hidden_size,
        "moe": {"experts": cfg.num_experts, "top_k": cfg.top_k_experts} if cfg.enable_moe_block else None,
        "attention_k_eq_v": cfg.attention_k_eq_v,
        "quantization": quant,
        "components": {
            c: {
                "params": sizes.params[c],
                "fp4_params": sizes.fp4_params[c],
                "bytes": sizes.bytes[c],
                "dtypes": sorted(sizes.dtypes[c]),
            }
            for c in sizes.bytes
            if sizes.bytes[c]
        },  # fmt: skip
        "total_params": sizes.total_params,
        "total_bytes": sizes.total_bytes,
        "files": {f.name: f.stat().st_size for f in files},
    }


def run(args: argparse.Namespace) -> int:
    info = describe(Path(args.checkpoint))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"architecture  {', '.join(info['architecture'])}  ({info['model_type']})")
    print(
        f"layers        {info['layers']} ({info['sliding_layers']} sliding, {info['global_layers']} global)"
    )
    if info["moe"]:
        print(f"moe           {info['moe']['experts']} experts, top-{info['moe']['top_k']}")
    quant = info["quantization"]
    print(f"quantization  {quant.get('quant_algo') or quant.get('quant_method') if quant else 'none'}")
    print(f"\n{'component':<14}{'params':>16}{'in FP4':>16}{'bytes':>16}  dtypes")
    for name, c in info["components"].items():
        print(f"{name:<14}{c['params']:>16,}{c['fp4_params']:>16,}{c['bytes']:>16,}  {','.join(c['dtypes'])}")
    print(f"{'total':<14}{info['total_params']:>16,}{'':>16}{info['total_bytes']:>16,}")
    print()
    for name, size in info["files"].items():
        print(f"{name:<40}{size / 2**20:>12.2f} MiB")
    return 0
