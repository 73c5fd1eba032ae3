"""Time `quantize --calibration gptq` against max on random checkpoints of the exact Gemma 4 26B-A4B shapes.

Run on the lent GPU:  PYTHONPATH=src python scripts/gpu_gptq_scale.py --out $OUT/quantize-gptq.json
CPU dry run at small shapes:  PYTHONPATH=src python scripts/gpu_gptq_scale.py --small --device cpu

Builds the checkpoints on the device (vocab 262,144, hidden 2,816, 128 experts of 704, outlier input channels,
one shard per layer, BF16): a 1-layer one (a global layer: the last layer is always global) and a 6-layer
one (5 sliding + 1 global) sharing the embeddings;
then runs each (layers, method) in its own process with the default calibration (128 x 512 tokens of the
built-in corpus) and reports wall time, time per layer, the refine pass's stages (statistics forwards, the
solve, the final forward, writing) and peak RSS / GPU memory. A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvfp4kit.config import config_from_dict, load_preset  # noqa: F401 (load_preset checks the preset)
from nvfp4kit.testing.tiny import write_tokenizer

PRESET = Path(__file__).resolve().parent.parent / "src/nvfp4kit/presets/gemma-4-26b-a4b.json"
SMALL = dict(
    hidden_size=256, intermediate_size=192, moe_intermediate_size=64, num_experts=16, vocab_size=4096,
    vocab_size_per_layer_input=4096, head_dim=64, global_head_dim=128, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, sliding_window=64,
)  # fmt: skip


def text_config(layers: int, small: bool) -> dict:
    text = dict(json.loads(PRESET.read_text())["config"]["text_config"])
    if small:
        text.update(SMALL)
    text["num_hidden_layers"] = layers
    # transformers (and our config) force the last layer global: a 1-layer model is one global layer
    text["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return text


def layer_weights(cfg, i: int, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random BF16 weights of layer i with HF names, as testing.tiny.random_weights makes them (outliers on)."""

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    def linear(*shape: int) -> torch.Tensor:
        w = randn(*shape, std=shape[-1] ** -0.5)
        cols = torch.randperm(shape[-1], generator=gen, device=device)[: max(1, shape[-1] // 32)]
        w[..., cols] *= 20.0  # a few input channels 20x larger, as real weights show
        return w

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + randn(dim, std=0.1)

    h, p = cfg.hidden_size, f"model.layers.{i}."
    hd, kv, heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
    w = {p + "self_attn.q_proj.weight": linear(heads * hd, h), p + "self_attn.q_norm.weight": norm(hd),
         p + "self_attn.k_proj.weight": linear(kv * hd, h), p + "self_attn.k_norm.weight": norm(hd),
         p + "self_attn.o_proj.weight": linear(h, heads * hd)}  # fmt: skip
    if cfg.layer_has_v_proj(i):
        w[p + "self_attn.v_proj.weight"] = linear(kv * hd, h)
    inter, e, mi = cfg.layer_intermediate_size(i), cfg.num_experts, cfg.moe_intermediate_size
    w |= {p + "mlp.gate_proj.weight": linear(inter, h), p + "mlp.up_proj.weight": linear(inter, h),
          p + "mlp.down_proj.weight": linear(h, inter), p + "layer_scalar": torch.tensor([0.8], device=device),
          p + "router.proj.weight": linear(e, h) * 4.0, p + "router.scale": norm(h),
          p + "router.per_expert_scale": 0.5 + torch.rand(e, generator=gen, device=device),
          p + "experts.gate_up_proj": linear(e, 2 * mi, h), p + "experts.down_proj": linear(e, h, mi)}  # fmt: skip
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                 "post_feedforward_layernorm_2"):  # fmt: skip
        w[p + name + ".weight"] = norm(h)
    return {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in w.items()}


def write_folder(folder: Path, layers: int, small: bool, shards: Path) -> Path:
    """A checkpoint folder whose shards (one per layer, plus the embeddings) are links into `shards`."""
    folder.mkdir(parents=True, exist_ok=True)
    text = text_config(layers, small)
    config = {"architectures": ["Gemma4ForCausalLM"], **text, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, text["vocab_size"])
    files = ["embed.safetensors"] + [
        f"layer{i}-{t[:4]}.safetensors" for i, t in enumerate(text["layer_types"])
    ]
    weight_map = {}
    for f in files:
        for name in json.loads((shards / (f + ".names")).read_text()):
            weight_map[name] = f
        link = folder / f
        if not link.exists():
            link.symlink_to(shards / f)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def build(root: Path, small: bool, device: str) -> tuple[Path, Path]:
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    cfg1, cfg6 = config_from_dict(text_config(1, small)), config_from_dict(text_config(6, small))
    cfg = cfg6
    gen = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    parts = {"embed.safetensors": lambda: {
        "model.embed_tokens.weight": (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen, device=device)
                                      * cfg.hidden_size**-0.5).to(torch.bfloat16).cpu(),
        "model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)}}  # fmt: skip
    parts["layer0-full.safetensors"] = lambda: layer_weights(cfg1, 0, device, gen)
    for i, t in enumerate(cfg6.layer_types):
        parts[f"layer{i}-{t[:4]}.safetensors"] = lambda i=i: layer_weights(cfg6, i, device, gen)
    for f, make in parts.items():
        if not (shards / f).exists():
            tensors = make()
            save_file(tensors, str(shards / f))
            (shards / (f + ".names")).write_text(json.dumps(sorted(tensors)))
    print(f"built shards in {time.perf_counter() - started:.1f} s", flush=True)
    return write_folder(root / "ckpt1", 1, small, shards), write_folder(root / "ckpt6", 6, small, shards)


CHILD = r"""
import json, sys, time, resource, torch
from nvfp4kit.quant import quantize, calib_refine, calib_layer, shard_writer
src, out, method, device, samples, seq, asym = sys.argv[1:8]
cuda = device.startswith("cuda")
stages = {}
def timed(key_of, fn):
    def wrapper(*a, **k):
        if cuda: torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if cuda: torch.cuda.synchronize()
            key = key_of(a, k)
            stages[key] = stages.get(key, 0.0) + time.perf_counter() - t
    return wrapper
calib_refine._run_layer = timed(lambda a, k: "stats forwards" if k.get("record") else "final forward",
                                calib_refine._run_layer)
calib_layer.LayerRefiner.refine = timed(lambda a, k: "solve", calib_layer.LayerRefiner.refine)
shard_writer.ShardedWriter.add = timed(lambda a, k: "write", shard_writer.ShardedWriter.add)
refine = calib_refine.refine_checkpoint
import nvfp4kit.quant.pipeline as pipeline
pipeline.refine_checkpoint = timed(lambda a, k: "refine pass", refine)
t = time.perf_counter()
report = quantize(src, out, calibration=method, device=device, num_samples=int(samples), seq_len=int(seq),
                  progress=False, overwrite=True, asymmetric={"on": True, "off": False}.get(asym))
wall = time.perf_counter() - t
gpu = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
print("RESULT " + json.dumps({"seconds": round(wall, 2), "peak_rss_gib": round(report.peak_rss_bytes / 2**30, 2),
      "gpu_peak_gib": round(gpu, 2), "stages": {k: round(v, 2) for k, v in stages.items()}}), flush=True)
"""


def run_one(src: Path, layers: int, method: str, args) -> dict:
    out = Path(args.work) / f"out-{layers}-{method}"
    cmd = [sys.executable, "-c", CHILD, str(src), str(out), method, args.device, str(args.num_samples),
           str(args.seq_len), args.asymmetric]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    row = {"layers": layers, "method": method}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        row.update(error=f"timed out after {args.timeout} s")
        return row
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        row.update(error=(proc.stderr or proc.stdout)[-2000:])
        return row
    row |= json.loads(found[-1].removeprefix("RESULT "))
    row["process_seconds"] = round(time.perf_counter() - started, 2)
    shutil.rmtree(out, ignore_errors=True)  # disk: a 6-layer export is about 3 GB
    row["seconds_per_layer"] = round(row["seconds"] / layers, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gptq_scale")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes for a CPU dry run")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--methods", nargs="+", default=["max", "gptq"])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument(
        "--asymmetric",
        choices=["default", "on", "off"],
        default="default",
        help="gptq's full-precision twin stream (calib_asym); off: as measured on the H200",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    ckpt = dict(zip((1, 6), build(Path(args.work), args.small, args.device)))
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for layers in args.layers:
        for method in args.methods:
            rows.append(run_one(ckpt[layers], layers, method, args))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                result = {"card": card, "torch": torch.__version__, "shape": "small" if args.small else "26B-A4B",
                          "num_samples": args.num_samples, "seq_len": args.seq_len, "rows": rows}  # fmt: skip
                Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{card}, {args.num_samples} x {args.seq_len} calibration tokens")
    print(
        f"{'layers':>6} {'method':>6} {'total s':>8} {'s/layer':>8} {'RSS GiB':>8} {'GPU GiB':>8}  stages (s)"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['layers']:>6} {r['method']:>6}  ERROR {r['error'][-300:]}")
            continue
        st = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
        print(f"{r['layers']:>6} {r['method']:>6} {r['seconds']:>8} {r['seconds_per_layer']:>8} "
              f"{r['peak_rss_gib']:>8} {r['gpu_peak_gib']:>8}  {st}")  # fmt: skip


if __name__ == "__main__":
    main()
