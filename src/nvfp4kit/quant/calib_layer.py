"""Re-quantize the NVFP4 linears of one decoder layer with a calibration method, in dependency stages.

A layer's linears go in stages whose inputs depend on the stages before: q/k/v; o_proj (reads the attention
of the re-quantized q/k/v); the dense MLP and the experts (read the re-quantized attention block's output);
and on E2B/E4B the per-layer-input gate and projection (read the whole block's output). Each stage is
calibrated on inputs that come through the stages before it already re-quantized, and each re-quantized
weight is set back into the layer (dequantized) for what follows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nvfp4kit.formats.modelopt import expert_module, linear_tensors
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.gemma4 import DecoderLayer
from nvfp4kit.model.layers import Linear
from nvfp4kit.quant.calib_asym import corrected_weight
from nvfp4kit.quant.calib_experts import experts_per_batch, refine_experts
from nvfp4kit.quant.calib_hessian import CROSS, HessianBackend
from nvfp4kit.quant.calib_methods import GroupQuantizer

STAGES = ("qkv", "o", "ffn", "ple")  # a layer's linears in the order their inputs depend on each other


def linear_groups(layer: DecoderLayer, index: int) -> list[tuple[str, list[str], Linear]]:
    """(stage, HF module names, our fused Linear) of every dense linear of the layer."""
    p = f"layers.{index}."
    attn = layer.self_attn
    qkv = [p + "self_attn.q_proj"]
    if attn.computes_kv:
        qkv += [p + "self_attn.k_proj"] + ([p + "self_attn.v_proj"] if attn.has_v_proj else [])
    groups = [
        ("qkv", qkv, attn.qkv_proj), ("o", [p + "self_attn.o_proj"], attn.o_proj),
        ("ffn", [p + "mlp.gate_proj", p + "mlp.up_proj"], layer.mlp.gate_up_proj),
        ("ffn", [p + "mlp.down_proj"], layer.mlp.down_proj),
    ]  # fmt: skip
    if layer.ple:
        groups += [
            ("ple", [p + "per_layer_input_gate"], layer.per_layer_input_gate),
            ("ple", [p + "per_layer_projection"], layer.per_layer_projection),
        ]
    return groups


class LayerRefiner:
    """Re-quantizes NVFP4 linears (those the export `quant_reader` holds quantized); returns their new
    checkpoint tensors by name, input_scale copied from the export."""

    def __init__(self, quantizer: GroupQuantizer, quant_reader: CheckpointReader, prefix: str):
        self.quantizer = quantizer
        self.quant = quant_reader
        self.prefix = prefix

    def is_quantized(self, module: str) -> bool:
        return f"{self.prefix}{module}.weight_scale" in self.quant

    def tensors(self, module: str, q: NVFP4Tensor) -> dict[str, torch.Tensor]:
        key = f"{self.prefix}{module}.input_scale"
        input_scale = self.quant.get(key) if key in self.quant else None
        return linear_tensors(self.prefix + module, q, input_scale=input_scale)

    def active_stages(self, layer: DecoderLayer, index: int) -> list[str]:
        """The stages that have anything to re-quantize (attention-BF16 recipes skip q/k/v and o)."""
        found = {stage for stage, modules, _ in linear_groups(layer, index) if self.is_quantized(modules[0])}
        if layer.moe and self._experts_quantized(index):
            found.add("ffn")
        return [s for s in STAGES if s in found]

    def _experts_quantized(self, index: int) -> bool:
        return self.is_quantized(expert_module(f"layers.{index}.experts", 0, "gate_proj"))

    def refine_linear(
        self,
        linear: Linear,
        modules: list[str],
        hessian: torch.Tensor | None,
        cross: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Re-quantize one fused group (rows of `linear` split as `modules`) and set it back dequantized;
        given the asymmetric statistics `cross`, towards the full-precision stream's outputs (calib_asym)."""
        weight = linear.weight
        target = weight
        if cross is not None and hessian is not None:
            if hessian.dim() == 3:  # statistics per group of output rows (calib_guided): fit each group
                rows = weight.reshape(hessian.shape[0], -1, weight.shape[-1])
                target = corrected_weight(rows, hessian, cross).reshape(weight.shape)
            else:
                target = corrected_weight(weight, hessian, cross)
        parts = list(torch.split(target, list(linear.splits), dim=0)) if len(modules) > 1 else [target]
        quantized = self.quantizer(parts, hessian)
        out: dict[str, torch.Tensor] = {}
        for module, q in zip(modules, quantized):
            out.update(self.tensors(module, q))
        linear.set_weight(torch.cat([q.dequantize(weight.dtype) for q in quantized]))
        return out

    def refine(
        self,
        layer: DecoderLayer,
        index: int,
        hessians: dict[str, torch.Tensor],
        *,
        stages: Sequence[str] = STAGES,
    ) -> dict[str, torch.Tensor]:
        """Re-quantize the linears of `stages` with the given input statistics (none: data-free methods)."""
        out: dict[str, torch.Tensor] = {}
        for stage, modules, linear in linear_groups(layer, index):
            if stage in stages and self.is_quantized(modules[0]):
                hessian, cross = hessians.get(modules[0]), hessians.get(modules[0] + CROSS)
                out.update(self.refine_linear(linear, modules, hessian, cross))
        if "ffn" in stages and layer.moe and self._experts_quantized(index):
            out.update(self._refine_experts(layer, f"layers.{index}.", hessians))
        return out

    def _refine_experts(
        self, layer: DecoderLayer, p: str, hessians: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Every expert at once (calib_experts), written per expert as ModelOpt names them."""
        experts = layer.experts
        gate_up, down = experts.gate_up, experts.down
        stats = {k: hessians.get(f"{p}experts.{k}") for k in ("gate_up", "down", "tokens")}
        targets = []
        for name, w in (("gate_up", gate_up), ("down", down)):
            cross = hessians.get(f"{p}experts.{name}{CROSS}")
            h, tokens = stats[name], stats["tokens"]
            if cross is None or h is None or tokens is None:
                targets.append(w)
            else:
                targets.append(_corrected_experts(w, h, cross, tokens))
        quantized = refine_experts(
            self.quantizer,
            targets[0],
            targets[1],
            hessian_gate_up=stats["gate_up"],
            hessian_down=stats["down"],
            tokens=stats["tokens"],
        )
        del targets
        # set back dequantized first (on the device), then the checkpoint tensors from one CPU copy each
        new_gate_up = torch.cat([q.dequantize(gate_up.dtype) for q in quantized[:2]], dim=1)
        experts.set_weights(new_gate_up, quantized[2].dequantize(down.dtype))
        out: dict[str, torch.Tensor] = {}
        cpu = [q.to("cpu") for q in quantized]
        for e in range(gate_up.shape[0]):
            for proj, q in zip(("gate_proj", "up_proj", "down_proj"), cpu):
                out.update(self.tensors(expert_module(p + "experts", e, proj), q.expert(e)))
        return out


def _corrected_experts(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """calib_asym's W' of every expert, as many at a time as calib_experts solves (bounded temporaries);
    experts with fewer tokens than inputs keep their weights (calib_experts shrinks them)."""
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    experts, rows, k = weight.shape
    step = experts_per_batch(experts, rows, k, weight.device)
    for a in range(0, experts, step):
        sl = slice(a, min(a + step, experts))
        out[sl] = corrected_weight(weight[sl], hessian[sl], cross[sl], keep=tokens[sl] < k)
    return out


def watch_stage(backend: HessianBackend, layer: DecoderLayer, index: int, stage: str) -> None:
    """Record only the inputs of `stage`'s linears (the earlier stages are already re-quantized), each token
    weighted by how the norm after the branch scales its error (see calib_hessian)."""
    p = f"layers.{index}."
    backend.clear()
    backend.recording = True
    attn = layer.self_attn
    if stage == "qkv":  # q_norm, k_norm and v_norm normalise each head
        backend.watch_normed(attn.qkv_proj.weight, p + "self_attn.q_proj", group=attn.head_dim)
        backend.stop_after = p + "self_attn.q_proj"  # the rest of the layer cannot change X^T X
    elif stage == "o":  # post_attention_layernorm
        backend.watch_normed(attn.o_proj.weight, p + "self_attn.o_proj", group=attn.o_proj.out_features)
        backend.stop_after = p + "self_attn.o_proj"
    elif stage == "ffn":  # post_feedforward_layernorm(_1) after down_proj; _2 after the experts
        mlp = layer.mlp
        backend.watch_pair(
            mlp.gate_up_proj.weight, p + "mlp.gate_proj", mlp.down_proj.weight, p + "mlp.down_proj"
        )
        if layer.moe:
            backend.watch_experts(layer.experts.gate_up, p + "experts")
    elif stage == "ple":  # post_per_layer_input_norm after the projection
        backend.watch_pair(
            layer.per_layer_input_gate.weight,
            p + "per_layer_input_gate",
            layer.per_layer_projection.weight,
            p + "per_layer_projection",
        )
    else:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
