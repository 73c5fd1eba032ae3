"""Batch-1 dense linears with many more programs than one wave: split-K beyond `tuning.search._splits`' 1-2 waves.

`scripts/gpu_gemv_floor.py` (H100, session 15) found the batch-1 W4A16 linears bound by their grid and K loop, not
by the FP4 decode: the same grid only loading the bytes takes 10.6 us for the qkv weights that 16 KB streaming
programs read in 5.4 us. Each program walks K (11 steps at K=2816) behind a 2-3 stage pipeline, ~2 programs an SM.
This times, for every 26B-A4B dense linear at M=1, tensor-core and GEMV tiles with split-K up to 8 (several waves,
fewer K steps a program) and narrow GEMV tiles, each checked against fp32 math first, in CUDA graphs as
`nvfp4kit bench kernels` times. Run on the GPU from the repository root:
  PYTHONPATH=src python3 scripts/gpu_gemv_split_probe.py [--json OUT] [--ops dense_qkv_sliding ...]
`--family rows` times whole-row GEMV tiles instead: one K tile a program (block_k up to 4,096, masked past K,
split = ceil(K / block_k)), 2-8 rows, with and without the nibble halves. `scripts/gpu_unrolled_k_probe.py` (H200,
session 16) found that programs loading 4 whole rows in one load read the qkv weights in 5.7 us against 9.8 us
for the engine grid's K loop (11.5 us tuned).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from nvfp4kit.kernels.configs import (
    LinearConfig,
    cache_path,
    card_slug,
    config_to_dict,
    select_linear_config,
    triton_version,
)
from nvfp4kit.tuning.cases import DENSE_SHAPES, DenseCase
from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes, rotation_sets, time_graph


def row_candidates(k: int) -> dict[str, LinearConfig]:
    """Whole-row GEMV tiles: each program one K tile, at most 64 fp32 products a thread in flight."""
    out = {}
    for bk in (1024, 2048, 4096):
        if bk // 2 >= k:
            continue
        for bn in (2, 4, 8):
            for warps in (4, 8):
                if bn * bk > 64 * 32 * warps:
                    continue
                for halves in (False, True):
                    name = f"rows {bn}x{bk} w{warps}{' halves' if halves else ''}"
                    out[name] = LinearConfig(
                        "gemv", 1, bn, bk, -(-k // bk), num_warps=warps, num_stages=1, decode="asm",
                        halves=halves,
                    )  # fmt: skip
    return out


def halves_candidates() -> dict[str, LinearConfig]:
    """The split family's GEMV tiles with and without the nibble halves (whole-row tiles ran 5-15% faster with them
    on the H200, session 16)."""
    out = {}
    for name, cfg in candidates().items():
        if cfg.kernel == "gemv":
            out[name] = cfg
            out[name + " halves"] = dataclasses.replace(cfg, halves=True)
    return out


def candidates() -> dict[str, LinearConfig]:
    out = {}
    for bn, warps in ((16, 2), (32, 4), (64, 4)):
        for split in (1, 2, 4, 8):
            out[f"dot {bn}x256 w{warps} split {split}"] = LinearConfig(
                "dot", 16, bn, 256, split, num_warps=warps, num_stages=3, decode="asm"
            )
    for bn in (4, 8):
        for bk in (512, 1024):
            for split in (1, 2, 4):
                out[f"gemv {bn}x{bk} split {split}"] = LinearConfig(
                    "gemv", 1, bn, bk, split, num_warps=4, num_stages=2, decode="asm"
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--ops", nargs="+", default=list(DENSE_SHAPES))
    ap.add_argument("--family", choices=["split", "rows", "halves"], default="split")
    ap.add_argument(
        "--write-cache", action="store_true",
        help="keep each shape's winner (where it beats the tuned config) as its M=1 entry in this card's tuning "
        "cache ($NVFP4KIT_CACHE_DIR or ~/.cache/nvfp4kit/kernels), as `nvfp4kit tune` would",
    )  # fmt: skip
    args = ap.parse_args()
    copy = copy_bandwidth_gbps()
    l2 = l2_cache_bytes()
    rows, winners = [], {}
    for op in args.ops:
        n, k = DENSE_SHAPES[op]
        nbytes = n * k * 9 // 16
        sets = rotation_sets(nbytes, l2_bytes=l2)
        case = DenseCase.build(op, n, k, 1, sets=sets, bf16_sets=1)
        tuned = select_linear_config(1, n, k, device="cuda")
        timed = {"tuned": time_graph(case.call(tuned), sets=sets)}
        if args.family == "rows":
            family = row_candidates(k)
        else:
            family = candidates() if args.family == "split" else halves_candidates()
        for name, cfg in family.items():
            try:
                err = case.error(cfg)
                if err > 2e-2:
                    print(f"  {op} {name}: error {err:.3g}, skipped")
                    continue
                timed[name] = time_graph(case.call(cfg), sets=sets)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported and skipped
                print(f"  {op} {name}: {str(exc).splitlines()[0][:100]}")
        best = min(timed, key=timed.get)
        if best != "tuned":
            winners[f"{n}x{k}"] = {"1": config_to_dict(family[best])}
        row = {"op": op, "n": n, "k": k, "bytes": nbytes, "tuned_config": tuned.__dict__, "us": timed}
        rows.append(row)
        top = sorted(timed.items(), key=lambda kv: kv[1])[:5]
        print(
            f"{op:18} {nbytes / 1e6:5.1f} MB  tuned {timed['tuned']:6.2f} us ({nbytes / timed['tuned'] / 1e3:5.0f} GB/s)"
            f"  best {best}: {timed[best]:6.2f} us ({nbytes / timed[best] / 1e3:5.0f} GB/s)"
        )
        print("    top 5: " + ", ".join(f"{name} {us:.2f}" for name, us in top), flush=True)
    card = torch.cuda.get_device_name()
    print(f"{card}, copy bandwidth {copy:.0f} GB/s")
    if args.write_cache and winners:
        path = cache_path(card_slug("cuda"), triton_version())
        table = json.loads(path.read_text()) if path.is_file() else {}
        for shape, entries in winners.items():
            table.setdefault("linear", {}).setdefault(shape, {}).update(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True))
        print(f"wrote {len(winners)} M=1 entries to {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "copy_gbps": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
