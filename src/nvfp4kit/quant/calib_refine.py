"""Re-choose the weights of an NVFP4 export with a better calibration method, layer by layer.

Input: the BF16 checkpoint and its NVFP4 export by `quantize` (max calibration, ModelOpt format). Output: the
same checkpoint with every NVFP4 weight re-quantized by `method`: the same tensors with the same names, dtypes,
shapes and meaning (E2M1 codes, E4M3 block scales, FP32 weight_scale_2 shared as before by q/k/v, gate/up and
each expert's gate/up); input_scale, configs and everything else are copied unchanged.

Methods: `mse` searches block and tensor scales against weight error (no data); `mse-output` searches them
against each block's output error on calibration activations; `gptq` adds error-feedback rounding. Methods
that use data run the calibration tokens through the model one layer at a time, each layer fed the outputs of
the layers already re-quantized (so later layers correct for earlier ones), collecting X^T X for every
quantized linear and, per expert, for the tokens routed to it. Within a layer the linears go in three
stages (q/k/v; o_proj; MLP and experts), each calibrated on inputs that come through the stages before it
already re-quantized.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from nvfp4kit.config import load_config
from nvfp4kit.formats.modelopt import HF_QUANT_CONFIG, expert_module, linear_tensors
from nvfp4kit.formats.nvfp4 import NVFP4Tensor
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.gemma4 import DecoderLayer, Gemma4Model
from nvfp4kit.model.loader import fill_layer
from nvfp4kit.model.weight_sources import WeightSource
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.quant.calib_gptq import gptq_quantize_group
from nvfp4kit.quant.calib_hessian import HessianBackend
from nvfp4kit.quant.calib_search import quantize_group_searched
from nvfp4kit.quant.calibrate import CalibrationContext, chunk_samples
from nvfp4kit.quant.output_dir import check_output, copy_companions, publish, staging_folder
from nvfp4kit.quant.shard_writer import ShardedWriter, parse_size
from nvfp4kit.tokenizer import Tokenizer

GroupQuantizer = Callable[[list[torch.Tensor], torch.Tensor | None], list[NVFP4Tensor]]
METHODS: dict[str, tuple[GroupQuantizer, bool]] = {  # name -> (quantize a fused group, needs activations)
    "mse": (lambda weights, hessian: quantize_group_searched(weights), False),
    "mse-output": (lambda weights, hessian: quantize_group_searched(weights, hessian=hessian), True),
    # an expert no calibration token reached has no statistics: its scales are searched on weight error
    "gptq": (
        lambda weights, hessian: (
            gptq_quantize_group(weights, hessian) if hessian is not None else quantize_group_searched(weights)
        ),
        True,
    ),
}
CHUNK_TOKENS = 8192
STAGES = ("qkv", "o", "ffn")  # a layer's linears in the order their inputs depend on each other


def _split_rows(weight: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(weight, list(sizes), dim=0))


class _LayerRefiner:
    """Re-quantizes one decoder layer's NVFP4 linears; returns their new checkpoint tensors by name."""

    def __init__(self, quantizer: GroupQuantizer, quant_reader: CheckpointReader, prefix: str):
        self.quantizer = quantizer
        self.quant = quant_reader
        self.prefix = prefix

    def is_quantized(self, module: str) -> bool:
        return f"{self.prefix}{module}.weight_scale" in self.quant

    def _tensors(self, module: str, q: NVFP4Tensor) -> dict[str, torch.Tensor]:
        key = f"{self.prefix}{module}.input_scale"
        input_scale = self.quant.get(key) if key in self.quant else None
        return linear_tensors(self.prefix + module, q, input_scale=input_scale)

    def refine(
        self,
        layer: DecoderLayer,
        index: int,
        hessians: dict[str, torch.Tensor],
        *,
        stages: Sequence[str] = STAGES,
    ) -> dict[str, torch.Tensor]:
        """Re-quantize the linears of `stages`; each is set back into `layer` (dequantized) for what follows."""
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
        out: dict[str, torch.Tensor] = {}
        for stage, modules, linear in groups:
            if stage not in stages or not self.is_quantized(modules[0]):
                continue
            weight = linear.weight
            parts = _split_rows(weight, linear.splits) if len(modules) > 1 else [weight]
            quantized = self.quantizer(parts, hessians.get(modules[0]))
            for module, q in zip(modules, quantized):
                out.update(self._tensors(module, q))
            linear.set_weight(torch.cat([q.dequantize(weight.dtype) for q in quantized]))
        if "ffn" in stages and layer.moe and self.is_quantized(expert_module(p + "experts", 0, "gate_proj")):
            out.update(self._refine_experts(layer, p, hessians))
        return out

    def _refine_experts(self, layer: DecoderLayer, p: str, hessians) -> dict[str, torch.Tensor]:
        experts = layer.experts
        gate_up, down = experts.gate_up, experts.down
        inter = gate_up.shape[1] // 2
        out: dict[str, torch.Tensor] = {}
        new_gate_up, new_down = [], []
        for e in range(gate_up.shape[0]):
            gu = self.quantizer(
                [gate_up[e][:inter], gate_up[e][inter:]], hessians.get(f"{p}experts.{e}.gate_up")
            )
            (dn,) = self.quantizer([down[e]], hessians.get(f"{p}experts.{e}.down"))
            for proj, q in (("gate_proj", gu[0]), ("up_proj", gu[1]), ("down_proj", dn)):
                out.update(self._tensors(expert_module(p + "experts", e, proj), q))
            new_gate_up.append(torch.cat([q.dequantize(gate_up.dtype) for q in gu]))
            new_down.append(dn.dequantize(down.dtype))
        experts.set_weights(torch.stack(new_gate_up), torch.stack(new_down))
        return out


def _watch(backend: HessianBackend, layer: DecoderLayer, index: int, stage: str) -> None:
    """Record only the inputs of `stage`'s linears (the earlier stages are already re-quantized)."""
    p = f"layers.{index}."
    backend.clear()
    backend.recording = True
    attn = layer.self_attn
    if stage == "qkv":  # q_norm, k_norm and v_norm normalise each head
        backend.watch_normed(attn.qkv_proj.weight, p + "self_attn.q_proj", group=attn.head_dim)
    elif stage == "o":  # post_attention_layernorm
        backend.watch_normed(attn.o_proj.weight, p + "self_attn.o_proj", group=attn.o_proj.out_features)
    else:  # post_feedforward_layernorm(_1) after down_proj; post_feedforward_layernorm_2 after the experts
        mlp = layer.mlp
        backend.watch_pair(
            mlp.gate_up_proj.weight, p + "mlp.gate_proj", mlp.down_proj.weight, p + "mlp.down_proj"
        )
        if layer.moe:
            backend.watch_experts(layer.experts.gate_up, p + "experts")


def refine_checkpoint(
    src: str | Path,
    quantized: str | Path,
    out: str | Path,
    *,
    method: str = "gptq",
    calib_data: Sequence[str | Path] = (),
    num_samples: int = 128,
    seq_len: int = 512,
    device: str | torch.device = "cpu",
    shard_size: str | int = "5GB",
    norm_aware: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `out`: the NVFP4 export `quantized` of the BF16 checkpoint `src`, re-quantized with `method`.

    `calib_data`, `num_samples`, `seq_len`: calibration text as `quantize` takes it (default: the built-in
    corpus); text like the model's real use works best. `norm_aware`: weight tokens by how much the RMSNorm
    after each linear amplifies their error (calib_hessian). Runs on `device` in fp32, one layer at a time.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    src, quantized, out, device = Path(src), Path(quantized), Path(out), torch.device(device)
    if not (quantized / HF_QUANT_CONFIG).is_file():
        raise ValueError(
            f"{quantized} has no {HF_QUANT_CONFIG}: refine needs an NVFP4 export made by quantize"
        )
    cfg = load_config(src)
    if cfg.hidden_size_per_layer_input or cfg.num_kv_shared_layers:
        raise ValueError(
            "refine does not handle per-layer inputs or shared KV (E2B/E4B) yet; use max calibration for them"
        )
    check_output(quantized, out, overwrite=overwrite)
    quantizer, needs_data = METHODS[method]
    bf16, quant = CheckpointReader(src), CheckpointReader(quantized)
    source = WeightSource(bf16, cfg, dtype=torch.float32, device=device)
    refiner = _LayerRefiner(quantizer, quant, cfg.weight_prefix)
    hidden, lengths = None, []
    if needs_data:
        samples = calibration_samples(Tokenizer(src), calib_data, num_samples=num_samples, seq_len=seq_len)
        lengths = [len(s) for s in samples]
        ids = torch.tensor([t for s in samples for t in s], device=device)
        model = Gemma4Model(cfg)
        used, local = torch.unique(ids, return_inverse=True)
        model.embed_tokens = bf16.get(cfg.weight_prefix + "embed_tokens.weight")[used.cpu()].to(
            device, torch.float32
        )
        hidden = model.embed(local)
    stage = staging_folder(out)
    try:
        writer = ShardedWriter(stage, max_shard_bytes=parse_size(shard_size))
        layer_root = f"{cfg.weight_prefix}layers."
        for name in quant.names():
            if not name.startswith(layer_root):
                writer.add(name, quant.get(name))
        bar = tqdm(
            range(cfg.num_hidden_layers), desc=f"refine ({method})", unit="layer", disable=not progress
        )
        for i in bar:
            backend = HessianBackend(norm_aware=norm_aware)
            layer = DecoderLayer(cfg, i, backend)
            fill_layer(layer, source, f"layers.{i}.")
            layer.to(device)
            if hidden is None:
                refined = refiner.refine(layer, i, {})
            else:  # attention q/k/v, then o_proj on the re-quantized attention, then the MLP and experts
                refined = {}
                for step in STAGES:
                    _watch(backend, layer, i, step)
                    _run_layer(layer, hidden, lengths, cfg, device)
                    refined.update(refiner.refine(layer, i, backend.hessians, stages=(step,)))
                backend.recording = False
                hidden = _run_layer(layer, hidden, lengths, cfg, device)
            prefix = f"{layer_root}{i}."
            for name in quant.names():
                if name.startswith(prefix):
                    writer.add(name, refined[name] if name in refined else quant.get(name))
            missing = set(refined) - {n for n in quant.names() if n.startswith(prefix)}
            if missing:
                raise ValueError(f"refined tensors not in {quantized}: {sorted(missing)[:5]}")
        writer.close()
        for name in ("config.json", HF_QUANT_CONFIG):
            shutil.copy2(quantized / name, stage / name)
        copy_companions(quantized, stage)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        bf16.close()
        quant.close()
    return out


@torch.no_grad()
def _run_layer(layer: DecoderLayer, hidden: torch.Tensor, lengths: list[int], cfg, device) -> torch.Tensor:
    """The layer's outputs for all calibration tokens, a chunk of whole samples at a time."""
    result = torch.empty_like(hidden)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    kv_store: dict = {}
    for c, (a, b) in enumerate(chunk_samples(lengths, max_tokens=CHUNK_TOKENS)):
        sl = slice(offsets[a], offsets[b])
        ctx = CalibrationContext(cfg, lengths[a:b], chunk=c, kv_store=kv_store, device=device)
        result[sl] = layer(hidden[sl], ctx)
    return result
