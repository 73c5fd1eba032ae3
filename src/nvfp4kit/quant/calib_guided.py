"""Loss-aware token weights for the calibration statistics (GuidedQuant's idea, one weight per token).

GPTQ minimises sum_t ||dW x_t||^2: an output error counts the same on every token. To second order, what the
model's loss sees of an error e_t in a linear's output at token t is (g_t . e_t)^2, g_t the gradient of the
loss with respect to that output. Averaging over output channels (error directions unknown in advance)
leaves the weight ||g_t||^2 per token, so H = sum_t ||g_t||^2 x_t x_t^T. The gradients come from one
backward pass per chunk of calibration windows through the full-precision model, with the next-token
cross-entropy of the calibration text (`labels="data"`, the empirical Fisher) or of tokens drawn from the
model's own distribution (`labels="sampled"`: the Fisher, whose quadratic form is the second-order KL).

`GROUP_ROWS` > 0 keeps one weight per token and group of that many consecutive output rows instead
(GuidedQuant's grouping: H_G = sum_t (sum_{i in G} g_{t,i}^2) x_t x_t^T, the rows of group G solved with
H_G); 64 rows is one head of q/k/v in the demo model. Experts stay per token.

These weights replace the norm-aware ones (calib_hessian), which approximate one part of the same quantity
(the norm's amplification) without the rest of the network. Experts use the gradient at the MoE block's
output (calib_hessian multiplies in each routing weight squared), their gate/up the same as their down.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from nvfp4kit.config import load_config
from nvfp4kit.model.loader import load_model
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.plan.weights import parameter_counts
from nvfp4kit.quant.calib_hessian import CLIP
from nvfp4kit.quant.calib_layer import linear_groups
from nvfp4kit.quant.calibrate import CalibrationContext, chunk_samples
from nvfp4kit.quant.layer_quant import QuantizeError

LABELS = ("data", "sampled")
# fp32 weights plus the autograd graph of one chunk: what the gradient pass needs, as a multiple of the weights
GRADIENT_MEMORY_FACTOR = 1.5
GROUP_ROWS = 0  # 0: one weight per token; n: per token and group of n output rows (dense linears)


class GradientBackend(TorchBackend):
    """Torch ops that keep sum_i g_{t,i}^2 of the output gradient of watched linears and MoE blocks."""

    name = "gradient"

    def __init__(self, group_rows: int = 0) -> None:
        self.group_rows = group_rows
        self.names: dict[int, str] = {}
        self.squares: dict[str, torch.Tensor] = {}  # this chunk's ||g_t||^2 [T] by name

    def watch(self, weight: torch.Tensor, name: str) -> None:
        self.names[weight.data_ptr()] = name

    def _keep(self, y: torch.Tensor, weight: object, *, grouped: bool = True) -> torch.Tensor:
        name = self.names.get(weight.data_ptr()) if isinstance(weight, torch.Tensor) else None
        if name is not None and y.requires_grad:
            rows = (
                self.group_rows if grouped and self.group_rows and y.shape[-1] % self.group_rows == 0 else 0
            )

            def keep(grad: torch.Tensor, name: str = name) -> None:
                square = grad.detach().float().pow(2)
                if rows:  # [T, groups]
                    self.squares[name] = square.reshape(len(square), -1, rows).sum(-1)
                else:
                    self.squares[name] = square.sum(-1)

            y.register_hook(keep)
        return y

    def linear(self, x, weight):
        return self._keep(super().linear(x, weight), weight)

    def moe(self, x, topk_ids, topk_weights, gate_up, down):
        return self._keep(super().moe(x, topk_ids, topk_weights, gate_up, down), gate_up, grouped=False)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for the gradient pass on `device` (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_gradient_memory(src: str | Path, device: str | torch.device) -> None:
    """Refuse, before any work, a model whose loss-aware weights cannot be computed here: the gradient pass
    holds the whole text model in fp32 (26B-A4B: 101 GB), not one layer at a time like the rest of quantize."""
    device = torch.device(device)
    need = int(4 * parameter_counts(load_config(src)).total * GRADIENT_MEMORY_FACTOR)
    free = free_memory(device)
    if free is not None and need > free:
        raise QuantizeError(
            f"loss-aware calibration (gptq-guided) runs the whole model in fp32 for its gradients: about "
            f"{need / 2**30:.1f} GiB, but {device} has {free / 2**30:.1f} GiB free. Use --calibration gptq "
            "(layer by layer, no gradients), or a device with more memory"
        )


def token_sensitivities(
    src: str | Path,
    samples: list[list[int]],
    *,
    device: str | torch.device = "cpu",
    labels: str = "data",
    chunk_tokens: int = 8192,
    seed: int = 0,
    group_rows: int | None = None,
    layer_gradients: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token weights [T] (T = all tokens of `samples` end to end; [T, groups] with `group_rows`,
    default GROUP_ROWS) for every linear group the refine pass
    collects statistics for, keyed as calib_hessian keys them; each normalised to mean 1 and clipped at
    CLIP times its median (one token must not decide a layer's rounding). `layer_gradients`: a list that
    receives, from the same backward pass, the loss's gradient at every decoder layer's output [T, H]
    (fp16, scaled to a mean square of 1 per layer; calib_fisher's layer objective)."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
    device = torch.device(device)
    check_gradient_memory(src, device)
    cfg = load_config(src)
    backend = GradientBackend(GROUP_ROWS if group_rows is None else group_rows)
    model = load_model(src, dtype=torch.float32, device=device, backend=backend)
    model.requires_grad_(False)
    names = []
    for i, layer in enumerate(model.layers):
        for _, modules, linear in linear_groups(layer, i):
            backend.watch(linear.weight, modules[0])
            names.append(modules[0])
        if layer.moe:
            backend.watch(layer.experts.gate_up, f"layers.{i}.experts")
            names.append(f"layers.{i}.experts")
    lengths = [len(s) for s in samples]
    generator = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    outputs: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for c, (a, b) in enumerate(chunk_samples(lengths, max_tokens=chunk_tokens)):
        ids = torch.tensor([t for s in samples[a:b] for t in s], device=device)
        ctx = CalibrationContext(cfg, lengths[a:b], chunk=c, kv_store={}, device=device)
        backend.squares = {}
        with torch.enable_grad():
            hidden = model.embed(ids).requires_grad_(True)
            ple = model.per_layer_inputs(ids, hidden) if cfg.hidden_size_per_layer_input else None
            for i, layer in enumerate(model.layers):
                hidden = layer(hidden, ctx, ple[:, i] if ple is not None else None)
                if layer_gradients is not None:  # the whole dLoss/dh_i: every later layer's path included
                    hidden.register_hook(lambda g, i=i: outputs[i].append(g.detach().float()))
            logits = model.logits(model.norm(hidden))
            target, predicts = _targets(ids, lengths[a:b], logits, labels, generator)
            F.cross_entropy(logits[predicts], target, reduction="sum").backward()
        for n in names:  # a linear no gradient reached (none in Gemma 4) weighs its tokens equally
            parts[n].append(backend.squares.get(n, torch.ones(len(ids), device=device)))
    if layer_gradients is not None:
        for chunks in outputs:
            g = torch.cat(chunks)
            layer_gradients.append((g / g.pow(2).mean().sqrt().clamp_min(1e-30)).half())
            chunks.clear()
    return {n: _normalised(torch.cat(p)) for n, p in parts.items()}


def _targets(
    ids: torch.Tensor, lengths: list[int], logits: torch.Tensor, labels: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, positions that predict them): every position but each window's last."""
    last = torch.tensor(lengths, device=ids.device).cumsum(0) - 1
    predicts = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    predicts[last] = False
    if labels == "data":
        return ids.roll(-1)[predicts], predicts
    probs = torch.softmax(logits[predicts].detach(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), predicts


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    w = weights / weights.mean().clamp_min(1e-30)
    return w.clamp(max=CLIP * w.median().clamp_min(1e-12))
