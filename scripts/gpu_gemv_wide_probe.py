"""The wide fragment GEMV (kernels/gemv_mma_wide.py) against the engine's current choice at 17-128 tokens.

For each 26B-A4B dense linear and token count: the shipped table's config (`w4a16_linear` with no config), BF16
cuBLAS, and every fragment candidate `nvfp4kit tune` offers there (tuning/search.linear_candidates), each checked
against fp32 math and timed in CUDA graphs over weight copies rotated past the L2 (as `tune` times). The winners
at the tuned token counts (32, 64, 128) that beat the shipped config go into a tuning cache under
$NVFP4KIT_CACHE_DIR, so an engine run with that variable set uses them. Prints a table last; JSON under --out.
Usage (GPU machine, repository root):
  NVFP4KIT_CACHE_DIR=OUT/cache PYTHONPATH=src python3 scripts/gpu_gemv_wide_probe.py --out OUT [--ms 32 48 64 96 128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nvfp4kit.kernels.configs import cache_path, card_slug, config_to_dict, sm_count, triton_version
from nvfp4kit.tuning.autotune import write_cache
from nvfp4kit.tuning.cases import DENSE_SHAPES, DenseCase
from nvfp4kit.tuning.search import ERROR_BOUND, linear_candidates
from nvfp4kit.tuning.timing import l2_cache_bytes, rotation_sets, time_graph

TUNED_MS = (32, 64, 128)


def short(cfg) -> str:
    return f"m{cfg.block_m} rows{cfg.block_n}/{cfg.rows_per_warp} kw{cfg.num_warps} u{cfg.unroll}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ms", type=int, nargs="+", default=[32, 48, 64, 96, 128])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sms, l2 = sm_count("cuda"), l2_cache_bytes()
    rows, table = [], {}
    for op, (n, k) in DENSE_SHAPES.items():
        for m in args.ms:
            sets = rotation_sets(n * k * 9 // 16 + 2 * m * k, l2_bytes=l2)
            case = DenseCase.build(op, n, k, m, sets=sets, bf16_sets=max(2, sets // 4))
            row = {"op": op, "N": n, "K": k, "M": m}
            row["shipped_us"] = time_graph(case.call(None), sets=sets, calls=16, repeats=7)
            row["shipped_err"] = case.error(None)
            row["bf16_us"] = time_graph(case.bf16_call(), sets=len(case.bf16_weights), calls=16, repeats=7)
            best = (float("inf"), None)
            for cfg in linear_candidates(m, n, k, sms=sms, frag=True):
                if cfg.kernel != "frag":
                    continue
                err = case.error(cfg)
                if err > ERROR_BOUND:
                    print(f"{op} M={m} {short(cfg)}: ERROR {err:.2e}", flush=True)
                    row.setdefault("rejected", []).append(short(cfg))
                    continue
                us = time_graph(case.call(cfg), sets=sets, calls=16, repeats=7)
                row.setdefault("frag_us", {})[short(cfg)] = round(us, 2)
                best = min(best, (us, cfg), key=lambda b: b[0])
            if best[1] is not None:
                row["best_frag_us"], row["best_frag"] = best[0], short(best[1])
                if m in TUNED_MS and best[0] < row["shipped_us"]:
                    table.setdefault("linear", {}).setdefault(f"{n}x{k}", {})[str(m)] = config_to_dict(
                        best[1]
                    )
            rows.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "frag_us"}), flush=True)
            del case
            torch.cuda.empty_cache()
    path = cache_path(card_slug("cuda"), triton_version())
    write_cache(path, table)
    (args.out / "gemv_wide_probe.json").write_text(
        json.dumps({"card": torch.cuda.get_device_name(), "rows": rows, "cache": str(path)}, indent=1)
    )
    print(f"\n{'op':18s} {'M':>4s} {'shipped':>8s} {'bf16':>7s} {'wide':>7s} {'x':>5s}  best wide config")
    for r in rows:
        wide = r.get("best_frag_us", float("nan"))
        print(
            f"{r['op']:18s} {r['M']:4d} {r['shipped_us']:8.2f} {r['bf16_us']:7.2f} {wide:7.2f} "
            f"{r['shipped_us'] / wide:5.2f}  {r.get('best_frag', '-')}"
        )
    print(f"cache with {sum(len(v) for v in table.get('linear', {}).values())} entries: {path}")


if __name__ == "__main__":
    main()
