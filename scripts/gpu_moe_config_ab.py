"""A/B of fused-MoE configuration fields at chosen token counts (26B-A4B MoE layer), against the selected config.

For each M: the config the engine selects on this card (tuned table or heuristic, tiles path), then that config
with each variant's fields replaced (`--variant halves=1`, `--variant halves=1,num_stages=4`, ...), each checked
against fp32 math and timed in CUDA graphs over 8 routings. Prints us and the speed-up of each variant. Run on the
lent GPU from the repository root:

    PYTHONPATH=src python3 scripts/gpu_moe_config_ab.py --m 64 96 128 706 --variant halves=1 --json OUT.json

`--write-table DIR`: each M's fastest config (a variant that beat the selected one by over 2%, else the selected
one) goes into a tuning-cache table under DIR, as `nvfp4kit tune --cache-dir DIR` would write it, for
an engine A/B: `bench engine` with NVFP4KIT_CACHE_DIR=DIR, `serve --kernel-cache-dir DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from nvfp4kit.kernels.configs import MoEConfig, select_moe_config
from nvfp4kit.tuning.cases import MOE_SHAPE, MoECase
from nvfp4kit.tuning.timing import time_graph


def parse_variant(text: str) -> dict:
    """'halves=1,num_stages=4' -> {'halves': True, 'num_stages': 4} (typed by MoEConfig's fields)."""
    types = {f.name: f.type for f in dataclasses.fields(MoEConfig)}
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        if key not in types:
            raise SystemExit(f"unknown MoEConfig field {key!r}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        out[key] = (
            value == "1" or value.lower() == "true"
            if kind == "bool"
            else int(value)
            if kind == "int"
            else value
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[64, 96, 128, 706])
    ap.add_argument(
        "--variant", action="append", default=[], help="fields to replace, e.g. halves=1,num_stages=4"
    )
    ap.add_argument("--json")
    ap.add_argument("--write-table", metavar="DIR", help="a tuning-cache table of each M's fastest config")
    args = ap.parse_args()
    variants = {v: parse_variant(v) for v in args.variant}
    e, k, h, i = (MOE_SHAPE[key] for key in ("experts", "top_k", "hidden", "inter"))
    print(f"card: {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for m in args.m:
        case = MoECase.build(m, weight_sets=2, route_sets=8, with_bf16=False)
        base = dataclasses.replace(select_moe_config(m, e, k, h, i, device="cuda"), split=False, sorted=True)
        row = {
            "m": m,
            "selected": dataclasses.asdict(base),
            "selected_us": time_graph(case.call(base), sets=8),
        }
        for name, fields in variants.items():
            cfg = dataclasses.replace(base, **fields)
            err = case.error(cfg)
            row[name] = time_graph(case.call(cfg), sets=8) if err < 2e-2 else f"error {err:.2e}"
        rows.append(row)
        print(json.dumps({key: v for key, v in row.items() if key != "selected"}), flush=True)
        del case
        torch.cuda.empty_cache()
    print("\n| M | selected us | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for r in rows:
        cells = [
            f"{r[v]:.1f} ({r['selected_us'] / r[v]:.2f}x)" if isinstance(r[v], float) else r[v]
            for v in variants
        ]
        print(f"| {r['m']} | {r['selected_us']:.1f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    if args.write_table:
        write_table(args.write_table, rows, variants, f"{e}x{k}x{h}x{i}")


def write_table(folder: str, rows: list[dict], variants: dict[str, dict], shape: str) -> None:
    """Each M's winner as a `tune`-style cache entry; its path stays the selected one's (None: the token limits
    still choose the fragment kernels where they run, the entry sets the tiles)."""
    from nvfp4kit.kernels.configs import cache_path, card_slug, set_cache_dir, triton_version

    entries = {}
    for r in rows:
        timed = {name: r[name] for name in variants if isinstance(r[name], float)}
        best = min(timed, key=timed.get, default=None)
        if best is None or timed[best] >= r["selected_us"] / 1.02:
            best = None
        entries[str(r["m"])] = {**r["selected"], **(variants[best] if best else {})}
        print(f"table M={r['m']}: {best or 'selected'}")
    set_cache_dir(folder)
    target = cache_path(card_slug(), triton_version())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"moe": {shape: entries}}, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
