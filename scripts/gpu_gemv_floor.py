"""Where a batch-1 W4A16 GEMV's time goes: launch, memory, FP4 decode, split-K reduction (26B-A4B dense shapes).

For each dense linear at M=1, timed in CUDA graphs (20 launches a graph, weights rotated through copies larger
than L2, as `nvfp4kit bench kernels` times):
  tuned      `w4a16_linear` as the engine runs it (tuned table or heuristic);
  copy       the GEMV below with the engine's config: must equal `tuned` (sanity check of the copy);
  cast       the same, the FP4 decode replaced by a plain byte -> fp32 cast (wrong numbers: the decode's cost);
  noreduce   the same, every split writes its own partial, no arrival counter (wrong numbers: the reduction's cost);
  load       the same grid and loop loading the same bytes, summing them as integers (the memory + launch floor);
  stream     the weight bytes read as int32 by 16 KB programs (the best streaming floor for these bytes);
  empty      one program storing one value (a launch in a graph);
  cublas     BF16 `F.linear` on the dequantized weight (4x the bytes).
Run on the GPU from the repository root:  PYTHONPATH=src python3 scripts/gpu_gemv_floor.py [--json OUT]
On the CPU (`TRITON_INTERPRET=1`, tiny shapes, no timing) it checks the kernels' numbers: `--check-cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nvfp4kit.kernels.configs import LinearConfig, select_linear_config
from nvfp4kit.kernels.nvfp4_tile import fold_scale, load_act_tile, load_weight_raw, load_weight_tile
from nvfp4kit.kernels.split_k import arrival_counters
from nvfp4kit.kernels.w4a16_linear import _write_output, w4a16_linear
from nvfp4kit.tuning.cases import DENSE_SHAPES, random_nvfp4

# deeper pipelines and wider K tiles than the tuner's candidates (tuning/search.py stops at 3-4 stages): more weight
# bytes in flight a program, the latency-bound batch-1 kernels' missing ingredient if `load` is far above `stream`
SWEPT = ("dense_qkv_sliding", "dense_o_sliding", "dense_gate_up", "dense_down")
DEEP_CANDIDATES = {
    "gemv 8x512 s4 w4": LinearConfig("gemv", 1, 8, 512, 1, num_warps=4, num_stages=4, decode="asm"),
    "gemv 8x512 s6 w4": LinearConfig("gemv", 1, 8, 512, 1, num_warps=4, num_stages=6, decode="asm"),
    "gemv 16x512 s4 w4": LinearConfig("gemv", 1, 16, 512, 1, num_warps=4, num_stages=4, decode="asm"),
    "gemv 4x1024 s3 w4": LinearConfig("gemv", 1, 4, 1024, 1, num_warps=4, num_stages=3, decode="asm"),
    "dot 16x16x256 s5 w2": LinearConfig("dot", 16, 16, 256, 1, num_warps=2, num_stages=5, decode="asm"),
    "dot 16x32x256 s5 w4": LinearConfig("dot", 16, 32, 256, 1, num_warps=4, num_stages=5, decode="asm"),
    "dot 16x16x512 s4 w4": LinearConfig("dot", 16, 16, 512, 1, num_warps=4, num_stages=4, decode="asm"),
    # fewest main-loop instructions a weight on sm_90 (scripts/cpu_sass_counts.py style counts: 4.3-4.5 vs 5.8)
    "dot 16x64x256 w4 halves": LinearConfig("dot", 16, 64, 256, 1, num_warps=4, decode="asm", halves=True),
    "dot 16x32x256 w2 halves": LinearConfig("dot", 16, 32, 256, 1, num_warps=2, decode="asm", halves=True),
    "swap 16x32x256 w2": LinearConfig("dot", 16, 32, 256, 1, swap_ab=True, num_warps=2, decode="asm"),
}


@triton.jit
def _gemv_probe(
    x_ptr, w_ptr, s_ptr, s2_ptr, out_ptr, ws_ptr, counter_ptr, N, K, stride_wn, stride_sn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr,
    EVEN_K: tl.constexpr, CAST: tl.constexpr, REDUCE: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < 1
    rn_load = rn % N
    acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        x = load_act_tile(x_ptr, rm, m_ok, k0, K, K, BK, EVEN_K).to(tl.float32)
        if CAST:
            b, s = load_weight_raw(w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BK, True, EVEN_K)
            bf = b.to(tl.float32)
            w = tl.reshape(tl.join(bf, bf), [BN, BK]) + tl.sum(s.to(tl.float32), axis=1)[:, None]
        else:
            w = load_weight_tile(
                w_ptr, s_ptr, rn_load, k0, K, stride_wn, stride_sn, BN, BK, True, ASM, EVEN_K, tl.float32
            )
        acc += w[None, :, :] * x[:, None, :]
    y = tl.sum(acc, axis=2)
    if REDUCE:
        _write_output(y, out_ptr, ws_ptr, counter_ptr, s2_ptr, rm, rn, 1, N, N, pid_n, pid_k, SPLIT_K, ASM)
    else:
        mask = (rm[:, None] < 1) & (rn[None, :] < N)
        scaled = y * fold_scale(s2_ptr, 0, True, ASM)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], scaled.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_probe(
    w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn,
    BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BN], dtype=tl.int32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        b, s = load_weight_raw(w_ptr, s_ptr, rn % N, k0, K, stride_wn, stride_sn, BK, True, EVEN_K)
        acc += tl.sum(b.to(tl.int32), axis=1) + tl.sum(s.to(tl.int32), axis=1)
    tl.store(out_ptr + pid_k * N + rn, acc, mask=rn < N)


@triton.jit
def _stream_probe(src_ptr, out_ptr, WORDS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < WORDS, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(v, axis=0))


@triton.jit
def _empty_probe(out_ptr):
    tl.store(out_ptr, 1)


def probe_calls(x, weights, cfg, n, k, *, asm: bool):
    """name -> call(i) for the variants on rotated weight copies (see the module docstring)."""
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    even_k = k % cfg.block_k == 0
    grid = (triton.cdiv(n, cfg.block_n), split)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, 1, n), dtype=torch.float32, device=x.device)
    counters = arrival_counters(x.device, grid[0])
    loads = torch.empty((split, n), dtype=torch.int32, device=x.device)
    streams = [w.packed.view(torch.int32).reshape(-1) for w in weights]
    words = streams[0].numel()
    stream_out = torch.empty(triton.cdiv(words, 4096), dtype=torch.int32, device=x.device)

    def gemv(cast: bool, reduce: bool):
        def call(i: int):
            packed, scale, s2 = weights[i % len(weights)].kernel_operands()
            _gemv_probe[grid](
                x, packed, scale, s2, out, ws, counters, n, k, packed.stride(0), scale.stride(0),
                BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=split, ASM=asm, EVEN_K=even_k,
                CAST=cast, REDUCE=reduce, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            return out

        return call

    def load(i: int):
        packed, scale, _ = weights[i % len(weights)].kernel_operands()
        _load_probe[grid](
            packed, scale, loads, n, k, packed.stride(0), scale.stride(0),
            BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=split, EVEN_K=even_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return loads

    def stream(i: int):
        _stream_probe[(triton.cdiv(words, 4096),)](streams[i % len(streams)], stream_out, words, BLOCK=4096)
        return stream_out

    def empty(i: int):
        _empty_probe[(1,)](stream_out)
        return stream_out

    return {
        "copy": gemv(False, True),
        "cast": gemv(True, True),
        "noreduce": gemv(False, False),
        "load": load,
        "stream": stream,
        "empty": empty,
    }


def check_cpu() -> None:
    """Interpreter check on small shapes: the copied GEMV equals w4a16_linear, the load probe sums the bytes."""
    for n, k, cfg in ((24, 96, LinearConfig("gemv", 1, 8, 32, 2)), (40, 64, LinearConfig("gemv", 1, 16, 64))):
        weights = [random_nvfp4(n, k, device="cpu", seed=s) for s in range(2)]
        x = torch.randn(1, k, dtype=torch.float32)
        calls = probe_calls(x, weights, cfg, n, k, asm=False)
        for i in range(2):
            want = w4a16_linear(x, weights[i], config=cfg)
            got = calls["copy"](i)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
            sums = calls["load"](i).sum(0)
            ref = weights[i].packed.to(torch.int32).sum(1) + weights[i].scale.view(torch.uint8).to(
                torch.int32
            ).sum(1)
            assert torch.equal(sums, ref), (sums, ref)
    print("cpu check: ok")


def measure(op: str, n: int, k: int, *, l2_bytes: int, device: str = "cuda") -> dict:
    from nvfp4kit.tuning.timing import rotation_sets, time_graph

    nbytes = n * k * 9 // 16
    sets = rotation_sets(nbytes, l2_bytes=l2_bytes)
    weights = [random_nvfp4(n, k, device=device, seed=s) for s in range(sets)]
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    cfg = select_linear_config(1, n, k, device=device)
    row = {"op": op, "n": n, "k": k, "bytes": nbytes, "config": cfg.__dict__}
    row["tuned"] = time_graph(lambda i: w4a16_linear(x, weights[i % sets]), sets=sets)
    bf16_sets = rotation_sets(2 * n * k, l2_bytes=l2_bytes)
    bf16 = [weights[s % sets].dequantize(torch.bfloat16) for s in range(bf16_sets)]
    row["cublas"] = time_graph(lambda i: F.linear(x, bf16[i % bf16_sets]), sets=bf16_sets)
    bf16.clear()
    calls = probe_calls(x, weights, cfg, n, k, asm=cfg.decode == "asm")
    ref = w4a16_linear(x, weights[0])
    if cfg.kernel == "gemv":
        row["copy_max_abs_diff"] = (calls["copy"](0).float() - ref.float()).abs().max().item()
    else:  # a tensor-core config: only the floors (same grid: BN rows x BK columns a program)
        calls = {name: calls[name] for name in ("load", "stream", "empty")}
    for name, call in calls.items():
        row[name] = time_graph(call, sets=sets)
    if op in SWEPT:
        row["sweep"] = {}
        exact = x.float() @ weights[0].dequantize(torch.float32).T
        candidates = dict(DEEP_CANDIDATES)
        if cfg.kernel == "dot":  # the tuned tile with the nibble halves (two MMAs, no interleave)
            candidates["tuned + halves"] = dataclasses.replace(cfg, halves=True)
        for name, candidate in candidates.items():
            try:
                got = w4a16_linear(x, weights[0], config=candidate)
                err = ((got.float() - exact).norm() / exact.norm()).item()
                if err > 1e-2:
                    row["sweep"][name] = f"error {err:.2e}"
                    continue
                row["sweep"][name] = time_graph(
                    lambda i, c=candidate: w4a16_linear(x, weights[i % sets], config=c), sets=sets
                )
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is reported
                row["sweep"][name] = f"failed: {str(exc).splitlines()[0][:80]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--check-cpu", action="store_true")
    args = ap.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    from nvfp4kit.tuning.timing import copy_bandwidth_gbps, l2_cache_bytes

    copy_gbps = copy_bandwidth_gbps()
    l2 = l2_cache_bytes()
    rows = []
    for op, (n, k) in DENSE_SHAPES.items():
        rows.append(measure(op, n, k, l2_bytes=l2))
        print(json.dumps(rows[-1]), flush=True)
    names = ["tuned", "copy", "cast", "noreduce", "load", "stream", "empty", "cublas"]
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s; us per call (GB/s of the NVFP4 bytes)")
    print("| op | MB | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r[c]:.2f} ({r['bytes'] / r[c] / 1e3:.0f})" if c in r else "-" for c in names]
        print(f"| {r['op']} | {r['bytes'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    print("\ndeeper pipelines, us per call (tuned beside):")
    for r in rows:
        if "sweep" in r:
            cells = ", ".join(
                f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in r["sweep"].items()
            )
            print(f"  {r['op']} (tuned {r['tuned']:.2f}): {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
