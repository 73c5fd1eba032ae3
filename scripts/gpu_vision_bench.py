"""Time the Gemma 4 vision tower (encoder + pooling + projector) on a GPU and check it against fp32.

Builds a random 26B-A4B-shaped tower (27 layers x 1152, from the preset's vision_config; 2816-wide projector)
twice on one device: in BF16 (what the engine runs) and in fp32 (the reference), with the same weights. For one
image at the largest soft-token budget (1120), one at the default (280) and a batch of four 280-token images it
prints the time per call (CUDA events after warm-up), the relative error of the BF16 soft tokens against fp32,
and the encoder's measured peak memory next to what `nvfp4kit plan` reserves for it (`plan/vision.py`).

    PYTHONPATH=src python scripts/gpu_vision_bench.py --out $OUT            # H200: the numbers
    PYTHONPATH=src python scripts/gpu_vision_bench.py --device cpu --tiny   # smoke run (tests/vision)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from nvfp4kit.config import PRESET_DIR
from nvfp4kit.plan.vision import encoder_activation_bytes
from nvfp4kit.testing.tiny_config import TINY_VISION
from nvfp4kit.vision.config import vision_config_from_dict
from nvfp4kit.vision.loader import set_tower_tensor, tower_targets
from nvfp4kit.vision.tower import VisionTower

MiB = 2**20


def tower_shape(tiny: bool) -> tuple[dict, int]:
    """(vision_config, text hidden size): the tiny test tower, or 26B-A4B's."""
    if tiny:
        return dict(TINY_VISION), 64
    raw = json.loads((PRESET_DIR / "gemma-4-26b-a4b.json").read_text())["config"]
    vision = dict(raw["vision_config"])
    vision["rope_parameters"] = {
        **vision.get("rope_parameters", {}),
        "rope_type": "axial",
    }  # the tower's 2-D RoPE
    return vision, int(raw["text_config"]["hidden_size"])


def random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Weights of a trained tower's scale: norms near 1, linears with unit-variance outputs, clip bounds wide."""
    if name.endswith(("_min", "_max")):
        return torch.full(shape, -8.0 if name.endswith("_min") else 8.0, device=device)
    noise = torch.randn(shape, generator=gen, device=device)
    if "norm" in name or name.endswith("std_scale"):
        return 1 + 0.1 * noise
    if name.endswith(("std_bias", "position_embedding_table")):
        return 0.1 * noise
    return noise / shape[-1] ** 0.5


def random_towers(vision: dict, text_hidden: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The same random weights in a `dtype` tower and an fp32 reference tower (clip bounds fp32 in both)."""
    cfg = vision_config_from_dict(vision)
    test, ref = VisionTower(cfg, text_hidden), VisionTower(cfg, text_hidden)
    gen = torch.Generator(device=device).manual_seed(seed)
    for (name, (module, attr, shape)), (_, (ref_module, _, _)) in zip(
        tower_targets(test).items(), tower_targets(ref).items()
    ):
        tensor = random_tensor(name, shape, gen, device)
        set_tower_tensor(ref_module, attr, tensor)
        set_tower_tensor(module, attr, tensor if name.endswith(("_min", "_max")) else tensor.to(dtype))
    return test.to(device), ref.to(device)


def grid_image(soft_tokens: int, vision: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches of one image whose pooled grid is `soft_tokens` cells (about 3:4), with (x, y) positions."""
    rows = max(r for r in range(1, int((soft_tokens * 0.75) ** 0.5) + 1) if soft_tokens % r == 0)
    k, p = int(vision["pooling_kernel_size"]), int(vision["patch_size"])
    ph, pw = rows * k, soft_tokens // rows * k
    ys, xs = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    return torch.rand(ph * pw, 3 * p * p, generator=gen), positions


def time_calls(run, device: torch.device, repeats: int) -> float:
    """Milliseconds per call after warm-up (CUDA events on a GPU, wall time on the CPU)."""
    for _ in range(2):
        run()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - start) * 1e3 / repeats
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / repeats


def peak_bytes(run, device: torch.device) -> int | None:
    """Memory the call allocates beyond what was live before it (None on the CPU: not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@torch.inference_mode()
def bench(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not TF32
    torch.backends.cudnn.allow_tf32 = False
    vision, text_hidden = tower_shape(args.tiny)
    test, ref = random_towers(vision, text_hidden, device, dtype)
    gen = torch.Generator().manual_seed(1)
    largest, default = (140, 70) if args.tiny else (1120, 280)
    rows = []
    for soft, batch in ((largest, 1), (default, 1), (default, args.batch)):
        images = [grid_image(soft, vision, gen) for _ in range(batch)]
        patches = [p.to(device) for p, _ in images]
        positions = [xy.to(device) for _, xy in images]
        out = torch.cat(test(patches, positions)).float()
        want = torch.cat(ref(patches, positions))
        rel = float((out - want).norm() / want.norm())
        ms = time_calls(lambda: test(patches, positions), device, args.repeats)  # noqa: B023
        peak = peak_bytes(lambda: test(patches, positions), device)  # noqa: B023
        n = patches[0].shape[0]
        act = dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty((), dtype=dtype).element_size()
        planned = batch * encoder_activation_bytes(vision, n, text_hidden, act_bytes=act)
        rows.append({
            "soft_tokens": soft, "batch": batch, "patches_per_image": n, "ms": ms, "ms_per_image": ms / batch,
            "rel_error_vs_fp32": rel, "peak_bytes": peak, "planned_bytes": planned,
        })  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "dtype": args.dtype, "torch": torch.__version__, "tiny": args.tiny,
            "tower": {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "patch_size", "pooling_kernel_size")},
            "rows": rows}  # fmt: skip


def table(result: dict) -> str:
    mib = lambda b: "-" if b is None else f"{b / MiB:,.0f}"  # noqa: E731
    lines = [
        f"vision tower on {result['device']} ({result['dtype']}, torch {result['torch']})",
        f"{'soft tok':>8} {'batch':>5} {'patches':>7} {'ms':>8} {'ms/img':>8} {'rel err':>9} "
        f"{'peak MiB':>9} {'plan MiB':>9}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['soft_tokens']:>8} {r['batch']:>5} {r['patches_per_image']:>7} {r['ms']:>8.2f} "
            f"{r['ms_per_image']:>8.2f} {r['rel_error_vs_fp32']:>9.2e} {mib(r['peak_bytes']):>9} "
            f"{mib(r['planned_bytes']):>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument(
        "--tiny", action="store_true", help="the 2-layer test tower and budgets 140/70 (CPU smoke)"
    )
    p.add_argument("--batch", type=int, default=4, help="images in the batched row (default 4)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for vision_bench.json (default $OUT)")
    args = p.parse_args(argv)
    result = bench(args)
    print(table(result))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vision_bench.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
