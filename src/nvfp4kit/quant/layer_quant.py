"""Quantize one decoder layer's tensors into ModelOpt's layout, from the BF16 checkpoint and recorded amaxes.

Scale sharing is ModelOpt's: every member of a fused group (q/k/v; gate/up) gets weight_scale_2 from the
group's max |W| and input_scale from the group's input amax; each expert's gate and up share the scale_2 of
the fused [2I, H] slice; one input_scale per expert projection type serves all experts of the layer.
"""

from __future__ import annotations

import torch

from nvfp4kit.formats.modelopt import expert_module, linear_tensors
from nvfp4kit.formats.nvfp4 import BLOCK, global_scale, quantize
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.gemma4 import DecoderLayer
from nvfp4kit.quant.calibrate import DOWN, GATE_UP, RecordingBackend
from nvfp4kit.quant.heap import trim_heap
from nvfp4kit.quant.recipe import LayerPlan


class QuantizeError(ValueError):
    """A weight cannot be quantized as asked (shape, missing calibration)."""


def fused_module(module: str) -> str:
    """Our model's module holding an HF linear: q/k/v -> qkv_proj, gate/up -> gate_up_proj, else itself."""
    head, _, leaf = module.rpartition(".")
    if head.endswith("self_attn") and leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{head}.qkv_proj"
    if head.endswith(".mlp") and leaf in ("gate_proj", "up_proj"):
        return f"{head}.gate_up_proj"
    return module


def watch_layer(
    backend: RecordingBackend, layer: DecoderLayer, plan: LayerPlan, *, layer_prefix: str
) -> None:
    """Ask the recorder to note the inputs of every quantized linear (and the experts) of `layer`."""
    wanted = {fused_module(m) for m in plan.quantized}
    for group in plan.groups:
        ours = fused_module(group.modules[0])
        if ours not in wanted:
            continue
        linear = layer.get_submodule(ours.removeprefix(layer_prefix))
        backend.watch(linear.weight, ours)
    if plan.experts is not None and plan.experts_quantized:
        backend.watch(layer.experts.gate_up, plan.experts)


def _check_shape(name: str, weight: torch.Tensor) -> None:
    if weight.shape[-1] % BLOCK:
        raise QuantizeError(
            f"{name}: input dimension {weight.shape[-1]} is not a multiple of the NVFP4 block size {BLOCK}; "
            f"keep it in BF16 with --exclude '{name.removesuffix('.weight')}'"
        )


def _input_scale(amax: dict[str, torch.Tensor], key: str, module: str) -> torch.Tensor:
    value = amax.get(key)
    if value is None or not float(value) > 0:
        raise QuantizeError(
            f"{module}: calibration recorded no non-zero input for it (amax={value}); "
            "use more or longer calibration samples"
        )
    return global_scale(value)


def quantize_layer(
    reader: CheckpointReader,
    plan: LayerPlan,
    amax: dict[str, torch.Tensor],
    *,
    prefix: str,
    layer: int,
    moe_intermediate: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """All output tensors of layer `layer` (quantized linears, experts, and every other tensor copied as-is).

    The arithmetic runs on `device` (same IEEE operations, same bits on CPU and GPU); results come back to CPU.
    """
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for group in plan.groups:
        if group.modules[0] not in plan.quantized:
            continue
        names = [f"{prefix}{m}.weight" for m in group.modules]
        weights = [reader.get(n, device=device) for n in names]
        for name, w in zip(names, weights):
            _check_shape(name, w)
        scale_2 = global_scale(torch.stack([w.float().abs().amax() for w in weights]).amax())
        input_scale = _input_scale(amax, fused_module(group.modules[0]), prefix + group.modules[0])
        for module, w in zip(group.modules, weights):
            out.update(linear_tensors(prefix + module, quantize(w, scale_2=scale_2), input_scale=input_scale))
        done.update(names)
        del weights
        trim_heap()

    if plan.experts is not None and plan.experts_quantized:
        experts = prefix + plan.experts
        gate_up_name, down_name = f"{experts}.gate_up_proj", f"{experts}.down_proj"
        gate_up, down = reader.get(gate_up_name, device=device), reader.get(down_name, device=device)
        _check_shape(gate_up_name, gate_up)
        _check_shape(down_name, down)
        in_gate_up = _input_scale(amax, f"{plan.experts}:{GATE_UP}", f"{experts} (gate/up)")
        in_down = _input_scale(amax, f"{plan.experts}:{DOWN}", f"{experts} (down)")
        i = moe_intermediate
        for e in range(gate_up.shape[0]):
            fused = gate_up[e]
            shared = global_scale(fused.float().abs().amax())
            for proj, rows in (("gate_proj", fused[:i]), ("up_proj", fused[i:])):
                q = quantize(rows, scale_2=shared)
                out.update(linear_tensors(expert_module(experts, e, proj), q, input_scale=in_gate_up))
            q = quantize(down[e])
            out.update(linear_tensors(expert_module(experts, e, "down_proj"), q, input_scale=in_down))
            trim_heap()
        done.update((gate_up_name, down_name))
        del gate_up, down

    out = {name: t.cpu() for name, t in out.items()}
    layer_prefix = f"{prefix}layers.{layer}."
    for name in reader.names():
        if name.startswith(layer_prefix) and name not in done:
            out[name] = reader.get(name)
    return out
