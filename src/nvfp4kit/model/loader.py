"""Strict, streaming loading of a Gemma 4 checkpoint into `Gemma4Model`.

Tensors are read one at a time (memory-mapped) straight to the target device and dtype, so no second
full copy exists in RAM. Anything missing, unexpected or mis-shaped is an error that names the tensor.
Vision and audio towers are skipped here (`nvfp4kit.vision` loads the vision tower at the first image).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nvfp4kit.config import Gemma4TextConfig, load_config
from nvfp4kit.formats.safetensors_io import CheckpointError, CheckpointReader
from nvfp4kit.formats.weight_source import WeightSource, concat_out, select_source_class
from nvfp4kit.model.gemma4 import DecoderLayer, Gemma4Model
from nvfp4kit.model.layers import Linear
from nvfp4kit.model.ops import OpBackend, select_backend

log = logging.getLogger(__name__)

NON_TEXT_PREFIXES = (
    "model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
    "model.multi_modal_projector.",
)  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return table[dtype]


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str | OpBackend | None = None,
) -> Gemma4Model:
    """Build the model from a checkpoint folder (dense or quantized), strictly."""
    folder = Path(path)
    cfg = load_config(folder)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    ops = backend if backend is not None and not isinstance(backend, str) else select_backend(device, backend)
    raw_config = json.loads((folder / "config.json").read_text())
    reader = CheckpointReader(folder)
    source = select_source_class(folder, raw_config)(reader, cfg, dtype=dtype, device=device)
    model = Gemma4Model(cfg, backend=ops)
    fill_model(model, source)
    check_all_consumed(source)
    return model.to(device)


def fill_model(model: Gemma4Model, source: WeightSource, *, vocab_rows: int | None = None) -> None:
    """`vocab_rows`: the embedding / lm_head rows the source gives (a tensor-parallel rank's; default all)."""
    cfg = model.config
    rows = cfg.vocab_size if vocab_rows is None else vocab_rows
    model.embed_tokens = _checked(source.tensor("embed_tokens.weight"), (rows, cfg.hidden_size), "embed")
    if not cfg.tie_word_embeddings:
        model.lm_head = _lm_head(source, cfg, rows)
    _set_param(model.norm.weight, source, "norm.weight")
    if cfg.hidden_size_per_layer_input:
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        model.embed_tokens_per_layer = _checked(
            source.tensor("embed_tokens_per_layer.weight"), (cfg.vocab_size_per_layer_input, n * p), "ple"
        )
        _set_linear(model.per_layer_model_projection, source, ["per_layer_model_projection"])
        _set_param(model.per_layer_projection_norm.weight, source, "per_layer_projection_norm.weight")
    for i, layer in enumerate(model.layers):
        fill_layer(layer, source, f"layers.{i}.")


def fill_layer(layer: DecoderLayer, source: WeightSource, p: str) -> None:
    """Load one decoder layer's weights (also used by the layer-wise quantizer)."""
    attn = layer.self_attn
    names = [f"{p}self_attn.q_proj"]
    if attn.computes_kv:
        names.append(f"{p}self_attn.k_proj")
        if attn.has_v_proj:
            names.append(f"{p}self_attn.v_proj")
        _set_param(attn.k_norm.weight, source, f"{p}self_attn.k_norm.weight")
    _set_linear(attn.qkv_proj, source, names)
    _set_linear(attn.o_proj, source, [f"{p}self_attn.o_proj"])
    _set_param(attn.q_norm.weight, source, f"{p}self_attn.q_norm.weight")
    _set_linear(layer.mlp.gate_up_proj, source, [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"])
    _set_linear(layer.mlp.down_proj, source, [f"{p}mlp.down_proj"])
    norms = [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ]
    if layer.moe:
        norms += [
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        ]
        _set_linear(layer.router.proj, source, [f"{p}router.proj"])
        _set_param(layer.router.scale, source, f"{p}router.scale")
        _set_param(layer.router.per_expert_scale, source, f"{p}router.per_expert_scale")
        gate_up, down = source.experts(f"{p}experts")
        try:
            layer.experts.set_weights(gate_up, down)
        except ValueError as exc:
            raise CheckpointError(f"{source.key(p + 'experts')}: {exc}") from None
    if layer.ple:
        norms.append("post_per_layer_input_norm")
        _set_linear(layer.per_layer_input_gate, source, [f"{p}per_layer_input_gate"])
        _set_linear(layer.per_layer_projection, source, [f"{p}per_layer_projection"])
    for norm in norms:
        _set_param(getattr(layer, norm).weight, source, f"{p}{norm}.weight")
    layer.layer_scalar = _checked(source.tensor(f"{p}layer_scalar"), (1,), source.key(f"{p}layer_scalar"))


def _lm_head(source: WeightSource, cfg: Gemma4TextConfig, rows: int) -> torch.Tensor:
    # An untied head is stored outside the text tower's prefix ("lm_head.weight").
    key = "lm_head.weight"
    tensor = source.reader.get(key, device=source.device, dtype=source.dtype)
    source.consumed.add(key)
    return _checked(tensor, (rows, cfg.hidden_size), key)


def _set_linear(linear: Linear, source: WeightSource, names: list[str]) -> None:
    weights = [source.linear(n) for n in names]
    try:
        linear.set_weight(concat_out(weights, names=[source.key(n) for n in names]))
    except ValueError as exc:
        shapes = [tuple(w.shape) for w in weights]
        raise CheckpointError(
            f"{[source.key(n) for n in names]}: mis-shaped weights {shapes}: {exc}"
        ) from None


def _set_param(param: torch.nn.Parameter, source: WeightSource, name: str) -> None:
    param.data = _checked(source.tensor(name), tuple(param.shape), source.key(name))


def _checked(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def check_all_consumed(source: WeightSource) -> None:
    cfg = source.cfg
    skipped = [n for n in source.reader.names() if n.startswith(NON_TEXT_PREFIXES)]
    if skipped:
        log.info("skipping %d vision/audio tensors (text serving)", len(skipped))
    shared_kv = tuple(
        f"{cfg.weight_prefix}layers.{i}.self_attn.{part}"
        for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers)
        for part in ("k_proj", "v_proj", "k_norm", "v_norm")
    )  # layers that reuse another layer's KV have no K/V weights of their own (transformers ignores them too)
    unexpected = [
        n
        for n in source.reader.names()
        if n not in source.consumed and not n.startswith(NON_TEXT_PREFIXES) and not n.startswith(shared_kv)
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
        raise CheckpointError(f"{source.reader.folder}: unexpected tensors {sorted(unexpected)[:10]}{more}")
