"""Probe: does the sorted-mode MoE get faster when the FP4 nibbles are not interleaved back into K order?

The kernels of `kernels/fused_moe.py` expand a packed weight tile into its low-nibble and high-nibble halves and
`tl.join` + reshape them into one [BN, BK] tile in K order before the MMA. The dot sums over K in any order, so
this variant keeps the halves apart (even columns, odd columns) and splits the much smaller activation tile the
same way instead: two MMAs of BK/2 each, no weight interleave. Checked against `fused_moe` (same routing, same
tiles), then both timed at the given token counts (CUDA graphs, rotated weights and routings).

    PYTHONPATH=src python3 scripts/gpu_nibble_split_probe.py --m 16 64 706 [--out OUT.json]
CPU check (Triton interpreter, portable decoder): TRITON_INTERPRET=1 PYTHONPATH=src python3
    scripts/gpu_nibble_split_probe.py --device cpu --m 20 --shape 8x2x256x128
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.configs import MoEConfig, interpreting, select_moe_config
from nvfp4kit.kernels.fused_moe import _moe_sum_kernel, _weight_args, fused_moe
from nvfp4kit.kernels.moe_align import moe_align
from nvfp4kit.kernels.nvfp4_tile import _DECODE_PTX, decode_scale_fp16, fold_scale, load_weight_raw, mma
from nvfp4kit.tuning.cases import random_nvfp4, random_routing


@triton.jit
def _halves(b, s, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, DTYPE: tl.constexpr):
    """Raw NVFP4 tile (b [BN, BK/2] bytes, s [BN, BK/16]) -> (low nibbles = even K, high nibbles = odd K)."""
    if ASM:
        s_bf16 = (decode_scale_fp16(s).to(tl.float32) * 144115188075855872.0).to(tl.bfloat16)
        s_bytes = tl.reshape(tl.broadcast_to(s_bf16[:, :, None], [BN, BK // 16, 8]), [BN, BK // 2])
        lo, hi = tl.inline_asm_elementwise(
            _DECODE_PTX,
            "=r,=r,=r,=r,r,r,r",
            [s_bytes, b],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=4,
        )
    else:
        bu = b.to(tl.uint16)
        sc = tl.reshape(tl.broadcast_to(decode_scale_fp16(s)[:, :, None], [BN, BK // 16, 8]), [BN, BK // 2])
        lo = (((bu & 0x08) << 12) | ((bu & 0x07) << 9)).to(tl.float16, bitcast=True) * sc
        hi = (((bu & 0x80) << 8) | ((bu & 0x70) << 5)).to(tl.float16, bitcast=True) * sc
    return lo.to(DTYPE), hi.to(DTYPE)


@triton.jit
def _act_halves(x_ptr, rows, ok, k0, stride_xm, BM: tl.constexpr, BK: tl.constexpr):
    k = k0 + tl.arange(0, BK)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=ok[:, None], other=0.0)
    return tl.split(tl.reshape(x, [BM, BK // 2, 2]))


@triton.jit
def _gate_up_split(
    x_ptr, w_ptr, s_ptr, s2_ptr, act_ptr, pair_ids_ptr, block_expert_ptr, num_pairs, inter, hidden,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_am,
    TOP_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lanes = tl.arange(0, BM)
    expert = tl.load(block_expert_ptr + pid_m)
    pairs = tl.load(pair_ids_ptr + pid_m * BM + lanes)
    ok = (pairs < num_pairs) & ((lanes * 0 + expert) >= 0)
    tokens = tl.where(ok, pairs // TOP_K, 0)
    e = tl.maximum(expert, 0).to(tl.int64)
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % inter
    dtype = x_ptr.dtype.element_ty
    acc_gate = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(expert >= 0, hidden, 0)
    for k0 in range(0, k_end, BK):
        xe, xo = _act_halves(x_ptr, tokens, ok, k0, stride_xm, BM, BK)
        bg, sg = load_weight_raw(w_base, s_base, rn_load, k0, hidden, stride_wn, stride_sn, BK, True, True)
        bu, su = load_weight_raw(
            w_base, s_base, rn_load + inter, k0, hidden, stride_wn, stride_sn, BK, True, True
        )
        g_lo, g_hi = _halves(bg, sg, BN, BK, ASM, dtype)
        u_lo, u_hi = _halves(bu, su, BN, BK, ASM, dtype)
        acc_gate = mma(acc_gate, xe, tl.trans(g_lo), INTERPRET)
        acc_gate = mma(acc_gate, xo, tl.trans(g_hi), INTERPRET)
        acc_up = mma(acc_up, xe, tl.trans(u_lo), INTERPRET)
        acc_up = mma(acc_up, xo, tl.trans(u_hi), INTERPRET)
    scale = fold_scale(s2_ptr, e, True, ASM)
    gate = acc_gate * scale
    up = acc_up * scale
    h = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) * up
    act_rows = pid_m * BM + lanes
    mask = ok[:, None] & (rn[None, :] < inter)
    tl.store(act_ptr + act_rows[:, None] * stride_am + rn[None, :], h.to(dtype), mask=mask)


@triton.jit
def _down_split(
    act_ptr, w_ptr, s_ptr, s2_ptr, out_ptr, pair_ids_ptr, block_expert_ptr, topk_w_ptr, num_pairs, hidden, inter,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lanes = tl.arange(0, BM)
    expert = tl.load(block_expert_ptr + pid_m)
    pairs = tl.load(pair_ids_ptr + pid_m * BM + lanes)
    ok = (pairs < num_pairs) & ((lanes * 0 + expert) >= 0)
    act_rows = pid_m * BM + lanes
    e = tl.maximum(expert, 0).to(tl.int64)
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    rn = pid_n * BN + tl.arange(0, BN)
    rn_load = rn % hidden
    dtype = act_ptr.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(expert >= 0, inter, 0)
    for k0 in range(0, k_end, BK):
        ae, ao = _act_halves(act_ptr, act_rows, ok, k0, stride_am, BM, BK)
        b, s = load_weight_raw(w_base, s_base, rn_load, k0, inter, stride_wn, stride_sn, BK, True, True)
        lo, hi = _halves(b, s, BN, BK, ASM, dtype)
        acc = mma(acc, ae, tl.trans(lo), INTERPRET)
        acc = mma(acc, ao, tl.trans(hi), INTERPRET)
    route = tl.load(topk_w_ptr + pairs, mask=ok, other=0.0).to(tl.float32)
    y = acc * fold_scale(s2_ptr, e, True, ASM) * route[:, None]
    mask = ok[:, None] & (rn[None, :] < hidden)
    tl.store(out_ptr + pairs[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def moe_nibble_split(x, topk_ids, topk_w, gate_up, down, cfg: MoEConfig):
    num_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    tokens, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).contiguous()
    route = topk_w.reshape(-1).contiguous()
    gu, dn = _weight_args(gate_up, "gate_up"), _weight_args(down, "down")
    asm = cfg.decode == "asm" and not interpreting()
    pair_ids, block_expert = moe_align(ids, num_experts=num_experts, block_m=cfg.block_m, method=cfg.align)
    blocks = block_expert.numel()
    act = torch.empty((blocks * cfg.block_m, inter), dtype=x.dtype, device=x.device)
    _gate_up_split[(blocks, triton.cdiv(inter, cfg.gate_up_block_n))](
        x, gu[0], gu[1], gu[2], act, pair_ids, block_expert, ids.numel(), inter, hidden, x.stride(0),
        gu[3], gu[4], gu[5], gu[6], act.stride(0), TOP_K=top_k, BM=cfg.block_m, BN=cfg.gate_up_block_n,
        BK=cfg.gate_up_block_k, ASM=asm, INTERPRET=interpreting(), num_warps=cfg.gate_up_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    per_pair = torch.empty((ids.numel(), hidden), dtype=x.dtype, device=x.device)
    _down_split[(blocks, triton.cdiv(hidden, cfg.down_block_n))](
        act, dn[0], dn[1], dn[2], per_pair, pair_ids, block_expert, route, ids.numel(), hidden, inter,
        act.stride(0), dn[3], dn[4], dn[5], dn[6], per_pair.stride(0), BM=cfg.block_m, BN=cfg.down_block_n,
        BK=cfg.down_block_k, ASM=asm, INTERPRET=interpreting(), num_warps=cfg.down_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(tokens, triton.cdiv(hidden, block))](
        per_pair, out, hidden, per_pair.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block, PDL=False
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 706])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="128x8x2816x704", help="experts x top_k x hidden x inter")
    ap.add_argument("--out")
    args = ap.parse_args()
    e, k, h, i = (int(v) for v in args.shape.split("x"))
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gate_up = [random_nvfp4(2 * i, h, experts=e, device=dev, seed=10 + s) for s in range(2)]
    down = [random_nvfp4(h, i, experts=e, device=dev, seed=20 + s) for s in range(2)]
    rows = []
    for m in args.m:
        xs = [torch.randn(m, h, device=dev, dtype=dtype) for _ in range(4)]
        routes = [random_routing(m, e, k, device=dev, seed=s) for s in range(4)]
        cfg = select_moe_config(m, e, k, h, i, device=dev)
        if cfg.split or not cfg.sorted:
            cfg = MoEConfig(
                block_m=16, gate_up_block_n=64, gate_up_block_k=128, down_block_n=128, decode=cfg.decode
            )
        ids, w = routes[0]
        ref = fused_moe(xs[0], ids, w, gate_up[0], down[0], config=cfg).float()
        got = moe_nibble_split(xs[0], ids, w, gate_up[0], down[0], cfg).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        row = {"M": m, "config": cfg.__dict__, "max_rel_diff": err}
        if dev == "cuda":
            from nvfp4kit.tuning.timing import time_graph

            def call(variant, xs=xs, routes=routes, cfg=cfg):
                def run(j):
                    ids, w = routes[j % 4]
                    if variant == "split":
                        return moe_nibble_split(xs[j % 4], ids, w, gate_up[j % 2], down[j % 2], cfg)
                    return fused_moe(xs[j % 4], ids, w, gate_up[j % 2], down[j % 2], config=cfg)

                return run

            row["joined_us"] = time_graph(call("joined"), sets=8, calls=16, repeats=7)
            row["split_us"] = time_graph(call("split"), sets=8, calls=16, repeats=7)
        rows.append(row)
        print(
            f"M={m}: max rel diff {err:.2e} {row.get('joined_us', '')} -> {row.get('split_us', '')} us",
            flush=True,
        )
    print("\n   M  joined_us  split_us  speedup")
    for r in rows:
        if "split_us" in r:
            print(
                f"{r['M']:>4} {r['joined_us']:>10.1f} {r['split_us']:>9.1f} {r['joined_us'] / r['split_us']:>8.2f}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
