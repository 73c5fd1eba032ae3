"""Can a prefill layer hide its weight expansions behind its GEMMs (issue 15)? Session 23 found a prefill linear =
BF16 cuBLAS + the expansion of its NVFP4 weight (1.31-1.33x cuBLAS at 1,024 tokens). Here the expansion of the next
weight runs on a second stream while cuBLAS multiplies by the current one (two scratch buffers), over a layer's
dense linears in order (qkv, o, gate_up, down of a sliding and of a global layer), in CUDA graphs over weight sets
rotated past the L2. Rows per token count, us per layer pair:
  bf16     cuBLAS on BF16 copies (the floor)
  serial   expand, multiply, expand, multiply ... on one stream (the engine's path today)
  overlap  the next weight expanded on a side stream during this multiply (side stream at normal priority)
  hiprio   the same, side stream at high priority (its blocks dispatched first when the GEMM's blocks retire)
and the MoE's all-expert expansion (the grouped prefill path's, 128 experts) beside the attention-side GEMMs
(qkv + o of a global layer), and the expansion of the MoE's up projection beside the gate projection's grouped GEMM
(`torch._grouped_mm`, uniform routing): each alone, and both at once ("hidden": the share of the expansion's time
the overlap saved).
Usage (GPU machine, repository root): PYTHONPATH=src python3 scripts/gpu_prefill_overlap.py [--ms 1024 2048 8192]
Session 24 also ran cuBLAS with SMs left free (torch's experimental SM carveout) beside an expansion capped at a few
programs, and the MoE layer with its expansions beside the grouped GEMMs: that version of this script and the
kernels it needs are in commit 629704a (docs/benchmarks.md, "Session 24").
"""

# ruff: noqa: B023  (every lambda here is timed inside its loop iteration)
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from nvfp4kit.kernels.dequant import dequantize_nvfp4
from nvfp4kit.tuning.cases import DENSE_SHAPES, MOE_SHAPE, random_nvfp4
from nvfp4kit.tuning.timing import l2_cache_bytes, rotation_sets, time_graph

LAYER = [
    "dense_qkv_sliding", "dense_o_sliding", "dense_gate_up", "dense_down",
    "dense_qk_global", "dense_o_global", "dense_gate_up", "dense_down",
]  # fmt: skip


def run_chain(ws, xs, bufs, side: torch.cuda.Stream | None) -> None:
    """Each weight expanded then multiplied, in order; with `side`, weight j+1 expands there during multiply j."""
    if side is None:
        for w, x in zip(ws, xs):
            n, k = w.shape
            F.linear(x, dequantize_nvfp4(w, out=bufs[0][: n * k].view(n, k)))
        return
    main = torch.cuda.current_stream()
    views = [bufs[j % 2][: w.shape[0] * w.shape[1]].view(*w.shape) for j, w in enumerate(ws)]
    ready = [torch.cuda.Event() for _ in ws]
    done = [torch.cuda.Event() for _ in ws]
    side.wait_stream(main)  # fork: the buffers' earlier readers are done
    with torch.cuda.stream(side):
        dequantize_nvfp4(ws[0], out=views[0])
        ready[0].record(side)
    for j, x in enumerate(xs):
        if j + 1 < len(ws):
            with torch.cuda.stream(side):
                if j >= 1:
                    side.wait_event(done[j - 1])  # weight j+1 takes the buffer multiply j-1 read
                dequantize_nvfp4(ws[j + 1], out=views[j + 1])
                ready[j + 1].record(side)
        main.wait_event(ready[j])
        F.linear(x, views[j])
        done[j].record(main)
    main.wait_stream(side)  # join


def _hidden_table(title: str, rows, gemm: str, expand: str) -> None:
    """Per token count: the GEMM alone, the expansion alone, both on two streams (normal / high priority), and the
    share of the expansion's time the overlap saved."""
    print(f"\n{title}, us\n{'M':>5} {gemm:>8} {'expand':>8} {'both':>8} {'hiprio':>8}  hidden")
    for m, t in rows:
        both = min(t["both"], t["both_hiprio"])
        hidden = (t[gemm] + t[expand] - both) / t[expand]
        print(f"{m:5d} " + " ".join(f"{t[k]:8.1f}" for k in (gemm, expand, "both", "both_hiprio"))
              + f"  {100 * hidden:5.0f}%")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1024, 2048, 8192])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    l2 = l2_cache_bytes()
    shapes = [DENSE_SHAPES[name] for name in LAYER]
    layer_bytes = sum(2 * n * k for n, k in shapes)
    sets = rotation_sets(layer_bytes, l2_bytes=l2, cap=3)
    ws = [[random_nvfp4(n, k, seed=10 * s + j) for j, (n, k) in enumerate(shapes)] for s in range(sets)]
    dense = [[w.dequantize(torch.bfloat16) for w in layer] for layer in ws]
    biggest = max(n * k for n, k in shapes)
    bufs = [torch.empty(biggest, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    side = torch.cuda.Stream()
    high = torch.cuda.Stream(priority=-1)
    rows = []
    print(
        f"{torch.cuda.get_device_name()}: {sets} weight sets of {layer_bytes / 2**20:.0f} MiB (BF16)",
        flush=True,
    )
    for m in args.ms:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
        t = {
            "bf16": time_graph(lambda i: [F.linear(x, w) for x, w in zip(xs, dense[i])], sets=sets, calls=4),
            "expand": time_graph(
                lambda i: [
                    dequantize_nvfp4(w, out=bufs[0][: w.shape[0] * w.shape[1]].view(*w.shape)) for w in ws[i]
                ],
                sets=sets,
                calls=4,
            ),  # fmt: skip
            "serial": time_graph(lambda i: run_chain(ws[i], xs, bufs, None), sets=sets, calls=4),
            "overlap": time_graph(lambda i: run_chain(ws[i], xs, bufs, side), sets=sets, calls=4),
            "hiprio": time_graph(lambda i: run_chain(ws[i], xs, bufs, high), sets=sets, calls=4),
        }
        rows.append((m, t))
        print(f"M={m}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), flush=True)
        del xs
    # the MoE's all-expert expansion beside a global layer's qkv + o GEMMs
    e, h, inter = MOE_SHAPE["experts"], MOE_SHAPE["hidden"], MOE_SHAPE["inter"]
    gu = random_nvfp4(2 * inter, h, experts=e, seed=99)
    moe_out = torch.empty(e, 2 * inter, h, dtype=torch.bfloat16, device="cuda")
    attn = [dense[0][4], dense[0][5]]
    moe_rows = []
    for m in args.ms:
        xs = [torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in attn]

        def both(_i, stream=side):
            main = torch.cuda.current_stream()
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                dequantize_nvfp4(gu, out=moe_out)
            for x, w in zip(xs, attn):
                F.linear(x, w)
            main.wait_stream(stream)

        t = {
            "gemms": time_graph(lambda i: [F.linear(x, w) for x, w in zip(xs, attn)], sets=1, calls=4),
            "moe_expand": time_graph(lambda i: dequantize_nvfp4(gu, out=moe_out), sets=1, calls=4),
            "both": time_graph(both, sets=1, calls=4),
            "both_hiprio": time_graph(lambda i: both(i, high), sets=1, calls=4),
        }
        moe_rows.append((m, t))
        print(f"M={m} moe: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), flush=True)
    # the MoE's own grouped GEMM (gate rows of all experts) beside the expansion of the next projection (up)
    grouped_rows = []
    blocks = [torch.empty(e, inter, h, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    dequantize_nvfp4(gu, out=blocks[0], rows=(0, inter))
    for m in args.ms:
        pairs = m * MOE_SHAPE["top_k"]
        offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * (pairs // e)
        a = torch.randn(int(offs[-1]), h, device="cuda", dtype=torch.bfloat16)

        def grouped(_i):
            torch._grouped_mm(a, blocks[0].transpose(1, 2), offs=offs)

        def expand_up(_i):
            dequantize_nvfp4(gu, out=blocks[1], rows=(inter, inter))

        def together(_i, stream=side):
            main = torch.cuda.current_stream()
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                expand_up(_i)
            grouped(_i)
            main.wait_stream(stream)

        t = {
            "grouped": time_graph(grouped, sets=1, calls=4),
            "expand": time_graph(expand_up, sets=1, calls=4),
            "both": time_graph(together, sets=1, calls=4),
            "both_hiprio": time_graph(lambda i: together(i, high), sets=1, calls=4),
        }
        grouped_rows.append((m, t))
        print(f"M={m} grouped: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, us per sliding + global layer's dense linears")
    print(
        f"{'M':>5} {'bf16':>8} {'expand':>8} {'serial':>8} {'overlap':>8} {'hiprio':>8}  serial/bf16 overlap/bf16"
    )
    for m, t in rows:
        best = min(t["overlap"], t["hiprio"])
        print(f"{m:5d} " + " ".join(f"{t[k]:8.1f}" for k in ("bf16", "expand", "serial", "overlap", "hiprio"))
              + f"  {t['serial'] / t['bf16']:11.2f} {best / t['bf16']:11.2f}")  # fmt: skip
    _hidden_table("MoE gate_up expansion (128 experts) beside a global layer's qkv + o GEMMs", moe_rows,
                  "gemms", "moe_expand")  # fmt: skip
    _hidden_table("MoE grouped GEMM (gate, 128 experts, M x 8 rows) beside the next projection's expansion",
                  grouped_rows, "grouped", "expand")  # fmt: skip


if __name__ == "__main__":
    main()
