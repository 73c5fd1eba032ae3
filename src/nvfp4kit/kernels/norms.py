"""RMSNorm regions of a decoder layer, one launch each: plain, the FFN's inputs (the
post-attention residual add and the normed copies the dense MLP, the experts and the router read), and the FFN
tail (two post-norms, their sum normed again, the residual add, the layer scalar and the next layer's input
norm, so a decode step has no separate input-norm launch between layers).

One program normalises one row held whole in registers (BLOCK = next power of two >= the row), fp32 math
inside and one rounding per output (a residual that is also normalised again is rounded first, as if it had
been stored and read back). The references are the torch backend's methods (`nvfp4kit.model.ops`)
on fp32 inputs. No host syncs and only shape-sized outputs, so every op replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kit.kernels.launch import pdl_args, wait_for_inputs

MAX_ROW = 65536  # a row lives in registers; Gemma 4 rows are at most 5376


@triton.jit
def _normalised(x, n, eps):
    """x / rms(x) over the n valid entries of a zero-padded fp32 row."""
    return x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    n,
    stride_x,
    stride_out,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    y = _normalised(x, n, eps)
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _ffn_row(
    res_ptr, x_ptr, w_attn_ptr, w_mlp_ptr, w_experts_ptr, router_scale_ptr, h_ptr, mlp_ptr, experts_ptr,
    row, stored, n, stride_res, stride_x, eps, router_factor, HAS_EXPERTS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Row `row` of `ffn_inputs`: h and the MLP's (and experts') normed inputs, of which the first `stored`
    columns are stored (n, or 0 for none); returns the router's input in the activation dtype (a dense layer:
    h). kernels/ffn_router.py calls it too: both compute a row with the same operations in the same order."""
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    keep = cols < stored
    dtype = h_ptr.dtype.element_ty
    out = row * n + cols
    attn = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w_attn = tl.load(w_attn_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
    h = (h + _normalised(attn, n, eps) * w_attn).to(dtype)
    tl.store(h_ptr + out, h, mask=keep)
    # the FFN reads the stored (rounded) residual, as it would after a separate launch
    y = _normalised(h.to(tl.float32), n, eps)
    w_mlp = tl.load(w_mlp_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(mlp_ptr + out, (y * w_mlp).to(dtype), mask=keep)
    z = h
    if HAS_EXPERTS:
        w_experts = tl.load(w_experts_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        tl.store(experts_ptr + out, (y * w_experts).to(dtype), mask=keep)
        scale = tl.load(router_scale_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        z = (y * scale * router_factor).to(dtype)
    return z


@triton.jit
def _ffn_inputs_kernel(
    res_ptr,
    x_ptr,
    w_attn_ptr,
    w_mlp_ptr,
    w_experts_ptr,
    router_scale_ptr,
    h_ptr,
    mlp_ptr,
    experts_ptr,
    router_ptr,
    n,
    stride_res,
    stride_x,
    eps,
    router_factor,
    HAS_EXPERTS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    z = _ffn_row(
        res_ptr, x_ptr, w_attn_ptr, w_mlp_ptr, w_experts_ptr, router_scale_ptr, h_ptr, mlp_ptr, experts_ptr,
        row, n, n, stride_res, stride_x, eps, router_factor, HAS_EXPERTS, BLOCK,
    )  # fmt: skip
    if HAS_EXPERTS:
        cols = tl.arange(0, BLOCK)
        tl.store(router_ptr + row * n + cols, z, mask=cols < n)


@triton.jit
def _ffn_tail_kernel(
    h_ptr,
    mlp_ptr,
    experts_ptr,
    w_post_ptr,
    w_mlp_ptr,
    w_experts_ptr,
    scalar_ptr,
    w_next_ptr,
    out_ptr,
    next_ptr,
    n,
    stride_h,
    stride_mlp,
    stride_experts,
    eps,
    HAS_EXPERTS: tl.constexpr,
    HAS_SCALAR: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    mix = tl.load(mlp_ptr + row * stride_mlp + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_EXPERTS:
        experts = tl.load(experts_ptr + row * stride_experts + cols, mask=ok, other=0.0).to(tl.float32)
        w_mlp = tl.load(w_mlp_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        w_experts = tl.load(w_experts_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        mix = _normalised(mix, n, eps) * w_mlp + _normalised(experts, n, eps) * w_experts
    w_post = tl.load(w_post_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    out = h + _normalised(mix, n, eps) * w_post
    if HAS_SCALAR:
        out *= tl.load(scalar_ptr).to(tl.float32)
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n + cols, out, mask=ok)
    if HAS_NEXT:  # the next layer's input norm of the stored (rounded) residual
        w_next = tl.load(w_next_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        normed = _normalised(out.to(tl.float32), n, eps) * w_next
        tl.store(next_ptr + row * n + cols, normed.to(next_ptr.dtype.element_ty), mask=ok)


def _row_launch(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n entries: about 8 to 16 entries per thread."""
    if n > MAX_ROW:
        raise ValueError(f"row of {n} entries is longer than the {MAX_ROW} a norm kernel holds")
    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 512))


def _rows(x: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """x as [rows, n] with unit column stride (a view when it can be)."""
    if x.shape[-1] != n:
        raise ValueError(f"{name} has {x.shape[-1]} features, expected {n}")
    rows = x.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _vector(w: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if w.numel() != n:
        raise ValueError(f"{name} has {w.numel()} entries, expected {n}")
    if w.dim() == 1 and w.is_contiguous():  # the usual case: no op (each costs host time per launch)
        return w
    return w.reshape(n) if w.is_contiguous() else w.contiguous().reshape(n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, *, eps: float) -> torch.Tensor:
    """x / rms(x) (* weight) over the last dim, in x.dtype."""
    n = x.shape[-1]
    rows = _rows(x, n, "x")
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    w = rows if weight is None else _vector(weight, n, "weight")
    if rows.shape[0]:
        block, warps = _row_launch(n)
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            w,
            out,
            n,
            rows.stride(0),
            out.stride(0),
            float(eps),
            HAS_WEIGHT=weight is not None,
            BLOCK=block,
            num_warps=warps,
            **pdl_args(out.device),
        )
    return out.reshape(x.shape)


def ffn_inputs(
    residual: torch.Tensor,
    attn_out: torch.Tensor,
    *,
    post_attn_norm: torch.Tensor,
    mlp_norm: torch.Tensor,
    experts_norm: torch.Tensor | None,
    router_scale: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """h = residual + post_attn_norm(attn_out) and rms_norm(h) times mlp_norm (and, for a MoE layer,
    experts_norm and router_scale * H**-0.5): two or four [T, H] outputs, one launch."""
    if residual.dim() != 2:
        raise ValueError(f"ffn_inputs takes residual [T, H], got shape {tuple(residual.shape)}")
    if (experts_norm is None) != (router_scale is None):
        raise ValueError("ffn_inputs needs both experts_norm and router_scale (MoE layer) or neither")
    t, n = residual.shape
    res, attn = _rows(residual, n, "residual"), _rows(attn_out, n, "attn_out")
    if attn.shape[0] != t:
        raise ValueError(f"attn_out has {attn.shape[0]} rows, residual has {t}")
    has_experts = experts_norm is not None
    outs = [
        torch.empty((t, n), dtype=residual.dtype, device=residual.device)
        for _ in range(4 if has_experts else 2)
    ]
    w_mlp = _vector(mlp_norm, n, "mlp_norm")
    w_experts = _vector(experts_norm, n, "experts_norm") if has_experts else w_mlp
    w_router = _vector(router_scale, n, "router_scale") if has_experts else w_mlp
    if t:
        block, warps = _row_launch(n)
        _ffn_inputs_kernel[(t,)](
            res,
            attn,
            _vector(post_attn_norm, n, "post_attn_norm"),
            w_mlp,
            w_experts,
            w_router,
            outs[0],
            outs[1],
            outs[-2],  # a dense layer stores neither: any tensor will do
            outs[-1],
            n,
            res.stride(0),
            attn.stride(0),
            float(eps),
            n**-0.5,
            HAS_EXPERTS=has_experts,
            BLOCK=block,
            num_warps=warps,
            **pdl_args(residual.device),
        )
    if not has_experts:
        return outs[0], outs[1], None, None
    return outs[0], outs[1], outs[2], outs[3]


def ffn_tail(
    h: torch.Tensor,
    mlp_out: torch.Tensor,
    experts_out: torch.Tensor | None,
    *,
    post_norm: torch.Tensor,
    post_mlp_norm: torch.Tensor | None,
    post_experts_norm: torch.Tensor | None,
    layer_scalar: torch.Tensor | None,
    next_norm: torch.Tensor | None = None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, next_norm(out)) with out = (h + post_norm(mix)) * layer_scalar and mix = post_mlp_norm(mlp_out) +
    post_experts_norm(experts_out); one launch."""
    if h.dim() != 2:
        raise ValueError(f"ffn_tail takes h [T, H], got shape {tuple(h.shape)}")
    t, n = h.shape
    rows, mlp = _rows(h, n, "h"), _rows(mlp_out, n, "mlp_out")
    has_experts = experts_out is not None
    if has_experts and (post_mlp_norm is None or post_experts_norm is None):
        raise ValueError("ffn_tail with experts_out needs post_mlp_norm and post_experts_norm")
    experts = _rows(experts_out, n, "experts_out") if has_experts else mlp
    for name, other in (("mlp_out", mlp), ("experts_out", experts)):
        if other.shape[0] != t:
            raise ValueError(f"{name} has {other.shape[0]} rows, h has {t}")
    w_post = _vector(post_norm, n, "post_norm")
    w_mlp = _vector(post_mlp_norm, n, "post_mlp_norm") if has_experts else w_post
    w_experts = _vector(post_experts_norm, n, "post_experts_norm") if has_experts else w_post
    w_next = _vector(next_norm, n, "next_norm") if next_norm is not None else w_post
    if layer_scalar is not None and layer_scalar.numel() != 1:
        raise ValueError(f"layer_scalar must hold one value, got shape {tuple(layer_scalar.shape)}")
    out = torch.empty((t, n), dtype=h.dtype, device=h.device)
    normed = torch.empty_like(out) if next_norm is not None else None
    if t:
        block, warps = _row_launch(n)
        _ffn_tail_kernel[(t,)](
            rows,
            mlp,
            experts,
            w_post,
            w_mlp,
            w_experts,
            w_post if layer_scalar is None else layer_scalar,
            w_next,
            out,
            out if normed is None else normed,
            n,
            rows.stride(0),
            mlp.stride(0),
            experts.stride(0),
            float(eps),
            HAS_EXPERTS=has_experts,
            HAS_SCALAR=layer_scalar is not None,
            HAS_NEXT=next_norm is not None,
            BLOCK=block,
            num_warps=warps,
            **pdl_args(out.device),
        )
    return out, normed
