"""Re-choose the weights of an NVFP4 export with a better calibration method, layer by layer.

Input: the BF16 checkpoint and its NVFP4 export by `quantize` (max calibration, ModelOpt format). Output: the
same checkpoint with every NVFP4 weight re-quantized by `method`: the same tensors with the same names, dtypes,
shapes and meaning (E2M1 codes, E4M3 block scales, FP32 weight_scale_2 shared as before by q/k/v, gate/up and
each expert's gate/up); input_scale, configs and everything else are copied unchanged.

Methods (calib_methods): `mse` searches block and tensor scales against weight error (no data); `mse-output`
searches them against each block's output error on calibration activations; `gptq` adds error-feedback
rounding. Methods that use data run the calibration tokens through the model one layer at a time, each layer
fed the outputs of the layers already re-quantized (so later layers correct for earlier ones), collecting
X^T X for every quantized linear and, per expert, for the tokens routed to it; within a layer the linears go
in dependency stages (calib_layer). E2B/E4B: the per-layer-input projection of the embeddings is re-quantized
first and the per-layer inputs computed through it; layers that reuse an earlier layer's keys/values read
those of its final (re-quantized) pass.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from nvfp4kit.config import Gemma4TextConfig, load_config
from nvfp4kit.formats.modelopt import HF_QUANT_CONFIG
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.gemma4 import DecoderLayer, Gemma4Model
from nvfp4kit.model.loader import fill_layer
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.model.weight_sources import WeightSource
from nvfp4kit.quant import calib_round
from nvfp4kit.quant.calib_block import tune_layer_scales
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.quant.calib_guided import token_sensitivities
from nvfp4kit.quant.calib_hessian import CaptureBackend, HessianBackend
from nvfp4kit.quant.calib_layer import LayerRefiner, watch_stage
from nvfp4kit.quant.calib_methods import CALIBRATION_METHODS, calibration_method
from nvfp4kit.quant.calib_round import (
    apply_rounding,
    layer_norms,
    layer_slots,
    learn_rounding,
    original_weights,
    slot_tensors,
)
from nvfp4kit.quant.calib_run import CHUNK_TOKENS, KVStore, Twin, run_layer
from nvfp4kit.quant.calib_window import After, next_layer_window
from nvfp4kit.quant.calibrate import chunk_samples
from nvfp4kit.quant.heap import trim_heap
from nvfp4kit.quant.output_dir import check_output, staged_output
from nvfp4kit.quant.shard_writer import ShardedWriter, parse_size
from nvfp4kit.tokenizer import Tokenizer

PLE_PROJECTION = "per_layer_model_projection"
BLOCK_LOG: list[dict] | None = None  # a list here collects each layer's calib_block report (studies)
ROUND_LOG: list[dict] | None = None  # and here each layer's calib_round report


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
    asymmetric: bool | None = None,
    learned_rounding: bool | None = None,
    loss_weights: str | None = None,
    block_scales: bool | None = None,
    layer_fisher: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `out`: the NVFP4 export `quantized` of the BF16 checkpoint `src`, re-quantized with `method`.

    `calib_data`, `num_samples`, `seq_len`: calibration text as `quantize` takes it (default: the built-in
    corpus); text like the model's real use works best. `norm_aware`: weight tokens by how much the RMSNorm
    after each linear amplifies their error (calib_hessian). `asymmetric`: also run the full-precision model
    beside the re-quantized one and fit each linear to its outputs (calib_asym; default: the method's
    choice, on for gptq). `learned_rounding`: then tune each layer's codes against the full-precision
    layer's outputs (calib_round; default: the method's choice). `loss_weights` ("data" or "sampled"): weight
    each token by the squared gradient of the loss at each linear's output instead (calib_guided).
    `block_scales`: last, tune the block scales of each whole layer against the full-precision layer's
    outputs (calib_block). `layer_fisher`: those two weigh each output error by the loss's gradients at the
    layer's output (calib_fisher). Runs on `device` in fp32, one layer at a time.
    """
    calib = calibration_method(method)
    if calib.quantize_group is None:
        refining = [name for name, m in CALIBRATION_METHODS.items() if m.refines]
        raise ValueError(f"{method!r} is what quantize writes; refine takes one of {', '.join(refining)}")
    src, quantized, out, device = Path(src), Path(quantized), Path(out), torch.device(device)
    asymmetric = calib.asymmetric if asymmetric is None else asymmetric
    rounding = calib.learned_rounding if learned_rounding is None else learned_rounding
    loss_weights = calib.loss_weights if loss_weights is None else loss_weights
    scales = calib.block_scales if block_scales is None else block_scales
    fisher = calib.layer_fisher if layer_fisher is None else layer_fisher
    if fisher and not (rounding or scales):
        raise ValueError("layer_fisher weighs learned rounding's or block scales' objective; neither is on")
    if (rounding or loss_weights or scales) and not calib.needs_data:
        raise ValueError(
            f"rounding, scale tuning and loss weights need calibration data; {method!r} uses none"
        )
    if not (quantized / HF_QUANT_CONFIG).is_file():
        raise ValueError(
            f"{quantized} has no {HF_QUANT_CONFIG}: refine needs an NVFP4 export made by quantize"
        )
    cfg = load_config(src)
    check_output(quantized, out, overwrite=overwrite)
    bf16, quant = CheckpointReader(src), CheckpointReader(quantized)
    source = WeightSource(bf16, cfg, dtype=torch.float32, device=device)
    refiner = LayerRefiner(calib.quantize_group, quant, cfg.weight_prefix)
    try:
        with staged_output(out, companions_from=quantized) as stage:
            writer = ShardedWriter(stage, max_shard_bytes=parse_size(shard_size))
            lengths: list[int] = []
            guide: dict[str, torch.Tensor] = {}
            gradients: list[torch.Tensor] = []  # per layer [T, H] (layer_fisher)
            hidden = ple = full_ple = None
            if calib.needs_data:
                samples = calibration_samples(
                    Tokenizer(src), calib_data, num_samples=num_samples, seq_len=seq_len
                )
                lengths = [len(s) for s in samples]
                if loss_weights is not None or fisher:  # one gradient pass for both
                    guide = token_sensitivities(src, samples, device=device, labels=loss_weights or "sampled",
                                                layer_gradients=gradients if fisher else None)  # fmt: skip
                    guide = guide if loss_weights is not None else {}
                ids = torch.tensor([t for s in samples for t in s], device=device)
                hidden, ple, full_ple, refined = _model_inputs(
                    cfg, source, refiner, ids, norm_aware=norm_aware, full=asymmetric
                )
            else:
                refined = _refine_ple_projection(cfg, source, refiner)
            layer_root = f"{cfg.weight_prefix}layers."
            for name in quant.names():
                if not name.startswith(layer_root):
                    writer.add(name, refined[name] if name in refined else quant.get(name))
            _check_known(refined, quant, cfg.weight_prefix, quantized)
            kv_store: KVStore = {}
            full = hidden.clone() if asymmetric and hidden is not None else None  # the full-precision stream
            kv_full: KVStore = {}
            bar = tqdm(
                range(cfg.num_hidden_layers), desc=f"refine ({method})", unit="layer", disable=not progress
            )
            for i in bar:
                backend = HessianBackend(norm_aware=norm_aware)
                backend.guide = guide
                layer = DecoderLayer(cfg, i, backend)
                fill_layer(layer, source, f"layers.{i}.")
                layer.to(device)
                layer_ple = ple[:, i] if ple is not None else None
                twin = None
                if full is not None:  # the same layer unquantized, fed the full-precision stream
                    capture = CaptureBackend()
                    twin_layer = DecoderLayer(cfg, i, capture)
                    fill_layer(twin_layer, source, f"layers.{i}.")
                    twin_layer.to(device)
                    twin_ple = full_ple[:, i] if full_ple is not None else None
                    twin = Twin(twin_layer, capture, backend, full, twin_ple, kv_full)
                if hidden is None:
                    refined = refiner.refine(layer, i, {})
                else:  # stage by stage, each on inputs through the re-quantized stages before it
                    refined = {}
                    originals = original_weights(layer, i) if rounding or scales else {}
                    for step in refiner.active_stages(layer, i):
                        watch_stage(backend, layer, i, step)
                        if twin is not None:
                            watch_stage(twin.capture, twin.layer, i, step)
                        run_layer(
                            layer, hidden, layer_ple, lengths, cfg, kv_store, device, record=True, twin=twin
                        )
                        refined.update(refiner.refine(layer, i, backend.hessians, stages=(step,)))
                        backend.clear()
                    backend.recording = False
                    if twin is not None:  # the twin never changes: a complete stage run gave its outputs
                        twin.capture.recording = False
                        if twin.out is not None and len(twin.finished) == _chunk_count(lengths):
                            full = twin.out
                        else:
                            full = run_layer(twin.layer, full, twin.ple, lengths, cfg, kv_full, device)
                        del twin
                    if rounding or scales:
                        target = full if full is not None else _full_precision_outputs(
                            cfg, source, i, hidden, layer_ple, lengths, device
                        )  # fmt: skip
                        grads = gradients[i].to(device) if fisher else None
                        after = None
                        window = next_layer_window(cfg, source, i, target, full_ple, lengths, device)
                        if window is not None:  # judged after the next (full-precision) layer
                            after, target = window
                            grads = gradients[i + 1].to(device) if fisher else None
                        if rounding:
                            refined.update(_round_layer(layer, i, refined, originals, hidden, target, layer_ple,
                                                        lengths, cfg, prefix=cfg.weight_prefix, bar=bar,
                                                        gradients=grads, after=after))  # fmt: skip
                        if scales:
                            tensors, report = tune_layer_scales(layer, i, refined, originals, hidden, target,
                                                                layer_ple, lengths, cfg, prefix=cfg.weight_prefix,
                                                                gradients=grads, after=after)  # fmt: skip
                            refined.update(tensors)
                            if report is not None:
                                bar.set_postfix_str(
                                    f"layer {i}: {report.loss_start:.3g} -> {report.loss_end:.3g}"
                                )
                                if BLOCK_LOG is not None:
                                    BLOCK_LOG.append({"layer": i, **vars(report)})
                        del originals, target, grads, after, window
                    hidden = run_layer(layer, hidden, layer_ple, lengths, cfg, kv_store, device)
                    assert hidden is not None
                prefix = f"{layer_root}{i}."
                for name in quant.names():
                    if name.startswith(prefix):
                        writer.add(name, refined[name] if name in refined else quant.get(name))
                _check_known(refined, quant, prefix, quantized)
                del layer, refined
                quant.close()  # unmap: pages of finished layers must not pile up in RSS
                bf16.close()
                trim_heap()
            writer.close()
            for name in ("config.json", HF_QUANT_CONFIG):
                shutil.copy2(quantized / name, stage / name)
    finally:
        bf16.close()
        quant.close()
    return out


def _round_layer(
    layer: DecoderLayer,
    index: int,
    refined: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    per_layer_input: torch.Tensor | None,
    lengths: list[int],
    cfg: Gemma4TextConfig,
    *,
    prefix: str,
    bar: tqdm,
    gradients: torch.Tensor | None = None,
    after: After | None = None,
) -> dict[str, torch.Tensor]:
    """Learned rounding of the layer's GPTQ codes and norms (calib_round); returns their new checkpoint tensors."""
    slots = layer_slots(layer, index, refined, originals, prefix)
    if not slots:
        return {}
    norms = layer_norms(layer) if calib_round.TUNE_NORMS else {}
    report = learn_rounding(layer, slots, inputs, targets, lengths, cfg, per_layer_input=per_layer_input,
                            norms=norms, gradients=gradients, after=after)  # fmt: skip
    if ROUND_LOG is not None:
        ROUND_LOG.append({"layer": index, **vars(report)})
    bar.set_postfix_str(
        f"layer {index}: output error {report.loss_start:.3g} -> {report.loss_end:.3g}, "
        f"{report.flipped / max(report.total, 1):.1%} codes moved"
    )
    out = {f"{prefix}layers.{index}.{n}": w.detach().to(torch.bfloat16).cpu() for n, w in norms.items()}
    for slot in slots.values():
        out.update(slot_tensors(slot, prefix))
    apply_rounding(layer, index, slots)
    return out


@torch.no_grad()
def _full_precision_outputs(
    cfg: Gemma4TextConfig,
    source: WeightSource,
    index: int,
    inputs: torch.Tensor,
    per_layer_input: torch.Tensor | None,
    lengths: list[int],
    device: torch.device,
) -> torch.Tensor:
    """The unquantized layer's outputs on the re-quantized stream (learned rounding without the twin)."""
    layer = DecoderLayer(cfg, index, TorchBackend())
    fill_layer(layer, source, f"layers.{index}.")
    layer.to(device)
    out = run_layer(layer, inputs, per_layer_input, lengths, cfg, {}, device)
    assert out is not None
    return out


def _check_known(
    refined: dict[str, torch.Tensor], quant: CheckpointReader, prefix: str, folder: Path
) -> None:
    missing = {n for n in refined if n.startswith(prefix)} - set(quant.names())
    if missing:
        raise ValueError(f"refined tensors not in {folder}: {sorted(missing)[:5]}")


def _refine_ple_projection(
    cfg: Gemma4TextConfig,
    source: WeightSource,
    refiner: LayerRefiner,
    model: Gemma4Model | None = None,
    hessian: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """E2B/E4B's projection of the embeddings into the per-layer inputs, re-quantized (set into `model`)."""
    if not cfg.hidden_size_per_layer_input or not refiner.is_quantized(PLE_PROJECTION):
        return {}
    if model is None:
        model = Gemma4Model(cfg)
        model.per_layer_model_projection.set_weight(source.linear(PLE_PROJECTION))
    return refiner.refine_linear(model.per_layer_model_projection, [PLE_PROJECTION], hessian)


@torch.no_grad()
def _model_inputs(
    cfg: Gemma4TextConfig,
    source: WeightSource,
    refiner: LayerRefiner,
    ids: torch.Tensor,
    *,
    norm_aware: bool,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Layer-0 inputs of the calibration tokens, the per-layer inputs (E2B/E4B) through the re-quantized
    projection and (`full`) through the unquantized one, and that projection's new tensors."""
    backend = HessianBackend(norm_aware=norm_aware)
    model = Gemma4Model(cfg, backend=backend)
    # only the table rows the calibration tokens use (a lookup is a copy, so this is exact)
    used, local = torch.unique(ids, return_inverse=True)
    model.embed_tokens = _rows(source, "embed_tokens.weight", used)
    hidden = model.embed(local)
    if not cfg.hidden_size_per_layer_input:
        return hidden, None, None, {}
    model.embed_tokens_per_layer = _rows(source, "embed_tokens_per_layer.weight", used)
    model.per_layer_model_projection.set_weight(source.linear(PLE_PROJECTION))
    model.per_layer_projection_norm.weight.data = source.tensor("per_layer_projection_norm.weight")
    model.to(ids.device)
    refined: dict[str, torch.Tensor] = {}
    full_ple = None
    if refiner.is_quantized(PLE_PROJECTION):  # per_layer_projection_norm normalises groups of P
        backend.watch_normed(
            model.per_layer_model_projection.weight, PLE_PROJECTION, group=cfg.hidden_size_per_layer_input
        )
        unquantized = model.per_layer_inputs(local, hidden)
        full_ple = unquantized if full else None
        del unquantized
        refined = _refine_ple_projection(cfg, source, refiner, model, backend.hessians[PLE_PROJECTION])
        backend.clear()
    backend.recording = False
    ple = model.per_layer_inputs(local, hidden)
    return hidden, ple, full_ple if full_ple is not None or not full else ple, refined


def _rows(source: WeightSource, name: str, rows: torch.Tensor) -> torch.Tensor:
    table = source.reader.get(source.key(name))
    return table[rows.cpu()].to(device=source.device, dtype=source.dtype)


def _chunk_count(lengths: list[int]) -> int:
    return sum(1 for _ in chunk_samples(lengths, max_tokens=CHUNK_TOKENS))
