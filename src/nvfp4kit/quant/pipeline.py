"""`quantize(src, out)`: BF16 Gemma 4 checkpoint -> NVFP4 checkpoint in ModelOpt's format, one layer at a time.

Calibration hidden states enter layer 0 from the embeddings; for each decoder layer we read its BF16 weights
from the shards, run the calibration tokens through our decoder layer (recording input amaxes), quantize its
linears, write them out, free the layer and hand its outputs to the next. RAM holds one layer plus the
calibration activations, never the model. Output lands in a temporary folder that is renamed at the end.

That pass is ModelOpt's `max` calibration. Any other calibration method (calib_methods) writes that export
to a hidden folder next to the output first and then re-quantizes its weights layer by layer into the output
(calib_refine), with the same calibration text, sample count and length.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from nvfp4kit.config import ConfigError, Gemma4TextConfig, load_config
from nvfp4kit.formats.modelopt import (
    hf_quant_config,
    linear_tensors,
    summarize_exclude_modules,
    write_quant_configs,
)
from nvfp4kit.formats.nvfp4 import global_scale
from nvfp4kit.formats.nvfp4 import quantize as quantize_weight
from nvfp4kit.formats.safetensors_io import CheckpointReader
from nvfp4kit.model.gemma4 import DecoderLayer, Gemma4Model
from nvfp4kit.model.loader import NON_TEXT_PREFIXES, fill_layer, resolve_dtype
from nvfp4kit.model.ops import TorchBackend
from nvfp4kit.model.weight_sources import WeightSource
from nvfp4kit.quant.calib_data import calibration_samples
from nvfp4kit.quant.calib_guided import check_gradient_memory
from nvfp4kit.quant.calib_methods import CALIBRATION_METHODS
from nvfp4kit.quant.calib_refine import refine_checkpoint
from nvfp4kit.quant.calibrate import CalibrationContext, RecordingBackend, chunk_samples
from nvfp4kit.quant.heap import trim_heap
from nvfp4kit.quant.layer_quant import QuantizeError, quantize_layer, watch_layer
from nvfp4kit.quant.output_dir import check_output, staged_output
from nvfp4kit.quant.recipe import LayerPlan, QuantRecipe
from nvfp4kit.quant.shard_writer import ShardedWriter, parse_size
from nvfp4kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)
CHUNK_TOKENS = 4096  # calibration tokens pushed through a layer at once (bounds activation memory)


@dataclass(frozen=True)
class QuantizeReport:
    output: Path
    layers: int
    quantized_linears: int
    samples: int
    tokens: int
    seconds: float
    peak_rss_bytes: int
    output_bytes: int
    exclude_modules: tuple[str, ...]
    calibration: str


def quantize(
    src: str | Path,
    out: str | Path,
    *,
    recipe: str = "all-nvfp4",
    exclude: Sequence[str] = (),
    calibration: str = "max",
    calib_data: Sequence[str | Path] = (),
    num_samples: int = 128,
    seq_len: int = 512,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    calib_dtype: str | torch.dtype | None = None,
    asymmetric: bool | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize the BF16 Gemma 4 checkpoint folder `src` to NVFP4 in `out` (ModelOpt 0.47's format).

    `calibration`: a name of `CALIBRATION_METHODS` (max, mse, mse-output, gptq). `calib_dtype` is the dtype
    the max pass calibrates in (default: float32 on CPU, bfloat16 on CUDA); the refine pass of the other
    methods runs in float32. Weights are always quantized from the checkpoint's own values. `asymmetric`:
    whether the refine pass fits each linear to the full-precision model's outputs (default: the method's
    choice; gptq does).
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    plan_recipe = QuantRecipe(recipe, tuple(exclude), calibration)
    max_pass = dict(
        recipe=plan_recipe, calib_data=calib_data, num_samples=num_samples, seq_len=seq_len,
        shard_size=shard_size, device=device, calib_dtype=calib_dtype, progress=progress,
    )  # fmt: skip
    if not CALIBRATION_METHODS[calibration].refines:
        return _quantize_max(src, out, overwrite=overwrite, started=started, **max_pass)
    check_output(src, out, overwrite=overwrite)  # before the long first pass, not after it
    if CALIBRATION_METHODS[calibration].loss_weights:
        check_gradient_memory(src, device)
    base = out.parent / f".{out.name}.max-{os.getpid()}"
    try:
        report = _quantize_max(src, base, overwrite=True, started=started, **max_pass)
        refine_checkpoint(src, base, out, method=calibration, calib_data=calib_data, num_samples=num_samples,
                          seq_len=seq_len, device=device, shard_size=shard_size, overwrite=overwrite,
                          asymmetric=asymmetric, progress=progress)  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return replace(
        report,
        output=out,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss(),
        calibration=calibration,
    )


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _quantize_max(
    src: Path,
    out: Path,
    *,
    recipe: QuantRecipe,
    calib_data: Sequence[str | Path],
    num_samples: int,
    seq_len: int,
    shard_size: str | int,
    overwrite: bool,
    device: str | torch.device,
    calib_dtype: str | torch.dtype | None,
    progress: bool,
    started: float,
) -> QuantizeReport:
    """The streaming max-calibrated export (ModelOpt's `max`)."""
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint {src} is not a folder")
    cfg = load_config(src)
    raw_config = json.loads((src / "config.json").read_text())
    if raw_config.get("quantization_config"):
        raise ConfigError(
            f"{src} is already quantized ({raw_config['quantization_config'].get('quant_method')})"
        )
    check_output(src, out, overwrite=overwrite)
    max_shard = parse_size(shard_size)
    reader = CheckpointReader(src)
    plans = [recipe.layer_plan(cfg, i, prefix=cfg.weight_prefix) for i in range(cfg.num_hidden_layers)]
    _check_source(reader, cfg, plans)
    device = torch.device(device)
    dtype = resolve_dtype(calib_dtype, device)
    samples = calibration_samples(Tokenizer(src), calib_data, num_samples=num_samples, seq_len=seq_len)

    try:
        with staged_output(out, companions_from=src) as stage:
            writer = ShardedWriter(stage, max_shard_bytes=max_shard)
            quantized = _quantize_tensors(
                reader, cfg, plans, recipe, samples, writer, dtype, device, progress
            )
            writer.close()
            excluded = _exclude_modules(reader, cfg, plans, quantized)
            write_quant_configs(stage, raw_config, hf_quant_config(excluded))
    finally:
        reader.close()
    return QuantizeReport(
        output=out,
        layers=cfg.num_hidden_layers,
        quantized_linears=len(quantized),
        samples=len(samples),
        tokens=sum(len(s) for s in samples),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss(),
        output_bytes=writer.total_bytes,
        exclude_modules=tuple(excluded),
        calibration="max",
    )


class _CheckpointDtypeSource(WeightSource):
    """Linears and experts stay in the checkpoint's dtype (BF16): the op backend casts each one per call
    (exact), so a layer costs its BF16 size in RAM rather than twice that in fp32."""

    def linear(self, name: str) -> torch.Tensor:
        return self.raw(f"{name}.weight")

    def experts(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.raw(f"{name}.gate_up_proj"), self.raw(f"{name}.down_proj")


def _check_source(reader: CheckpointReader, cfg: Gemma4TextConfig, plans: list[LayerPlan]) -> None:
    """Fail before any work: quantized or odd-shaped weights, so a long run never dies at layer 29."""
    prefix = cfg.weight_prefix
    for plan in plans:
        names = [f"{prefix}{m}.weight" for m in plan.quantized]
        if plan.experts is not None and plan.experts_quantized:
            names += [f"{prefix}{plan.experts}.gate_up_proj", f"{prefix}{plan.experts}.down_proj"]
        for name in names:
            info = reader.info(name)
            if info.dtype not in ("BF16", "F16", "F32"):
                raise ConfigError(f"{name} is {info.dtype}; quantize needs a BF16/FP16/FP32 checkpoint")
            if info.shape[-1] % 16:
                raise QuantizeError(
                    f"{name}: input dimension {info.shape[-1]} is not a multiple of the NVFP4 block size 16; "
                    f"keep it in BF16 with --exclude '{name.removesuffix('.weight')}'"
                )


def _dropped(cfg: Gemma4TextConfig) -> tuple[str, ...]:
    # K/V weights of layers that reuse another layer's cache are dead weight (transformers never loads them)
    return tuple(
        f"{cfg.weight_prefix}layers.{i}.self_attn.{part}"
        for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers)
        for part in ("k_proj", "v_proj", "k_norm", "v_norm")
    )


def _quantize_tensors(
    reader: CheckpointReader,
    cfg: Gemma4TextConfig,
    plans: list[LayerPlan],
    recipe: QuantRecipe,
    samples: list[list[int]],
    writer: ShardedWriter,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> list[str]:
    """Write every output tensor; returns the quantized module names (full checkpoint names)."""
    prefix = cfg.weight_prefix
    layer_root = f"{prefix}layers."
    dropped = _dropped(cfg)
    model_level = recipe.model_level_quantized(cfg, prefix=prefix)
    quantized_names: list[str] = []
    for name in reader.names():
        if name.startswith(layer_root) or any(name == f"{prefix}{m}.weight" for m in model_level):
            continue
        writer.add(name, reader.get(name))

    reader.close()
    source = _CheckpointDtypeSource(reader, cfg, dtype=dtype, device=device)
    ids = torch.tensor([t for s in samples for t in s], dtype=torch.long, device=device)
    lengths = [len(s) for s in samples]
    hidden, ple = _embed(cfg, source, ids, model_level, writer, quantized_names)
    reader.close()
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    chunks = list(chunk_samples(lengths, max_tokens=CHUNK_TOKENS))
    kv_store: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    bar = tqdm(range(cfg.num_hidden_layers), desc="quantize", unit="layer", disable=not progress)
    for i in bar:
        plan = plans[i]
        recorder = RecordingBackend(TorchBackend())
        layer = DecoderLayer(cfg, i, recorder)
        fill_layer(layer, source, f"layers.{i}.")
        layer.to(device)
        watch_layer(recorder, layer, plan, layer_prefix=f"layers.{i}.")
        with torch.no_grad():
            for c, (a, b) in enumerate(chunks):
                sl = slice(offsets[a], offsets[b])
                ctx = CalibrationContext(cfg, lengths[a:b], chunk=c, kv_store=kv_store, device=device)
                hidden[sl] = layer(hidden[sl], ctx, ple[sl, i] if ple is not None else None)
                trim_heap()
        del layer
        tensors = quantize_layer(
            reader,
            plan,
            recorder.amax,
            prefix=prefix,
            layer=i,
            moe_intermediate=cfg.moe_intermediate_size,
            device=device,
        )
        writer.add_all({k: v for k, v in tensors.items() if not k.startswith(dropped)})
        del tensors
        reader.close()  # unmap the shards: pages of finished layers must not pile up in RSS
        quantized_names += [prefix + m for m in sorted(plan.quantized)]
        if plan.experts is not None and plan.experts_quantized:
            quantized_names.append(prefix + plan.experts)
    return quantized_names


def _embed(
    cfg: Gemma4TextConfig,
    source: WeightSource,
    ids: torch.Tensor,
    model_level: list[str],
    writer: ShardedWriter,
    quantized_names: list[str],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer-0 inputs (and E2B/E4B per-layer inputs), quantizing the model-level PLE projection on the way."""
    recorder = RecordingBackend(TorchBackend())
    model = Gemma4Model(cfg, backend=recorder)
    # Only the rows the calibration tokens use are converted to the compute dtype (a lookup is a copy, so
    # this is exact), not the whole 262k-row table; the big tables stay in their checkpoint dtype.
    used, local_ids = torch.unique(ids, return_inverse=True)
    rows = used.cpu()
    model.embed_tokens = _rows(source, "embed_tokens.weight", rows)
    with torch.no_grad():
        hidden = model.embed(local_ids)
        ple = None
        if cfg.hidden_size_per_layer_input:
            model.embed_tokens_per_layer = _rows(source, "embed_tokens_per_layer.weight", rows)
            model.per_layer_model_projection.set_weight(source.linear("per_layer_model_projection"))
            model.per_layer_projection_norm.weight.data = source.tensor("per_layer_projection_norm.weight")
            model.to(ids.device)
            recorder.watch(model.per_layer_model_projection.weight, "per_layer_model_projection")
            ple = model.per_layer_inputs(local_ids, hidden)
    for module in model_level:
        name = f"{cfg.weight_prefix}{module}"
        weight = source.reader.get(f"{name}.weight")
        amax = recorder.amax.get(module)
        if amax is None or not float(amax) > 0:
            raise QuantizeError(f"{name}: calibration recorded no non-zero input for it")
        q = quantize_weight(weight, scale_2=global_scale(weight.float().abs().amax()))
        writer.add_all(linear_tensors(name, q, input_scale=global_scale(amax)))
        quantized_names.append(name)
    return hidden, ple


def _rows(source: WeightSource, name: str, rows: torch.Tensor) -> torch.Tensor:
    table = source.reader.get(source.key(name))
    return table[rows].to(device=source.device, dtype=source.dtype)


def _exclude_modules(
    reader: CheckpointReader, cfg: Gemma4TextConfig, plans: list[LayerPlan], quantized: list[str]
) -> list[str]:
    """ModelOpt's `exclude_modules`: lm_head, routers, BF16 text linears, vision/audio modules, as wildcards."""
    prefix = cfg.weight_prefix
    unquantized = ["lm_head"]
    for i, plan in enumerate(plans):
        for group in plan.groups:
            unquantized += [prefix + m for m in group.modules if m not in plan.quantized]
        if plan.experts is not None:
            unquantized.append(f"{prefix}layers.{i}.router.proj")
            if not plan.experts_quantized:
                unquantized.append(prefix + plan.experts)
    if cfg.hidden_size_per_layer_input and f"{prefix}per_layer_model_projection" not in quantized:
        unquantized.append(f"{prefix}per_layer_model_projection")
    for name in reader.names():
        info = reader.info(name)
        if name.startswith(NON_TEXT_PREFIXES) and name.endswith(".weight") and len(info.shape) >= 2:
            unquantized.append(name.removesuffix(".weight"))
    return summarize_exclude_modules(unquantized, quantized)
