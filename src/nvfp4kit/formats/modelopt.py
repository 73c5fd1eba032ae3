"""ModelOpt's NVFP4 checkpoint format (as `export_hf_checkpoint` of nvidia-modelopt 0.47 writes it), both ways.

Per quantized linear `<m>`: `<m>.weight` uint8 [N, K/2], `<m>.weight_scale` float8_e4m3fn [N, K/16],
`<m>.weight_scale_2` fp32 0-d, `<m>.input_scale` fp32 0-d. Gemma 4's fused experts are written per expert:
`<layer>.experts.{e}.{gate,up,down}_proj.*`. Everything else keeps its name and dtype. The config lives twice:
`hf_quant_config.json` and `config.json["quantization_config"]`; both are built here byte-for-byte as ModelOpt
builds them (same keys, order, indentation and exclude-list wildcards), so vLLM, SGLang and TensorRT-LLM load
our exports like ModelOpt's own. Loading: `ModelOptSource` reads NVFP4 linears into `NVFP4Tensor`s and fuses
q/k/v, gate/up and the experts for our model (lossless: those groups share `weight_scale_2`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from nvfp4kit.formats.nvfp4 import BLOCK, NVFP4Tensor, stack_experts
from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.formats.weight_source import Weight, WeightSource, concat_out

log = logging.getLogger(__name__)

QUANT_ALGO = "NVFP4"
WEIGHT_ONLY_ALGO = "W4A16_NVFP4"
HF_QUANT_CONFIG = "hf_quant_config.json"
# The format is ModelOpt 0.47's, stamped as ModelOpt stamps it: engines key their loaders on it.
PRODUCER = {"name": "modelopt", "version": "0.47.0"}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
# KV-cache scales ModelOpt writes on k/v projections when it quantized the KV cache; we keep KV in BF16.
KV_SCALE_SUFFIXES = ("k_scale", "v_scale")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ---- writing ------------------------------------------------------------------------------------------


def linear_tensors(
    module: str, weight: NVFP4Tensor, *, input_scale: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one NVFP4 linear, named and typed as ModelOpt exports them."""
    if weight.packed.dim() != 2:
        raise ValueError(
            f"{module}: ModelOpt stores 2-D linears, got packed shape {tuple(weight.packed.shape)}"
        )
    out = {
        f"{module}.weight": weight.packed.to(torch.uint8).contiguous(),
        f"{module}.weight_scale": weight.scale.to(torch.float8_e4m3fn).contiguous(),
        f"{module}.weight_scale_2": weight.scale_2.to(torch.float32).reshape(()).clone(),
    }
    if input_scale is not None:
        out[f"{module}.input_scale"] = input_scale.to(torch.float32).reshape(()).clone()
    return out


def expert_module(experts: str, expert: int, projection: str) -> str:
    """`model.layers.3.experts` + 5 + `up_proj` -> `model.layers.3.experts.5.up_proj`."""
    return f"{experts}.{expert}.{projection}"


def summarize_exclude_modules(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """Compress unquantized module names into prefix wildcards that match no quantized module.

    ModelOpt's rule (so our lists equal its lists): for each unquantized name, try the prefixes that end at a
    dot, shortest first, as `prefix*` and as the pair (`prefix`, `prefix.*`); take the first that matches no
    quantized module, or the name itself. A pair is written as `prefix.*` alone. Sorted, deduplicated.
    """
    blocked: set[str] = set()
    for name in quantized:
        blocked.add(name)
        blocked.update(name[:i] + "*" for i in range(len(name) + 1))

    chosen: set[str] = set()
    for name in unquantized:
        options = []
        for i, ch in enumerate(name):
            if ch == ".":
                options += [[name[:i] + "*"], [name[:i], name[:i] + ".*"]]
        options.append([name])
        pick: list[str] = []
        for option in options:
            if any(w in blocked for w in option):
                continue
            if not all(w in chosen for w in option):
                pick = option
            break
        if len(pick) == 2:
            chosen.add(pick[1])
        else:
            chosen.update(pick)
    return sorted(chosen)


def hf_quant_config(exclude_modules: list[str], *, weight_only: bool = False) -> dict[str, Any]:
    """The `hf_quant_config.json` document (single-format NVFP4 export, no KV-cache quantization)."""
    return {
        "producer": dict(PRODUCER),
        "quantization": {
            "quant_algo": WEIGHT_ONLY_ALGO if weight_only else QUANT_ALGO,
            "kv_cache_quant_algo": None,
            "group_size": BLOCK,
            "exclude_modules": list(exclude_modules),
        },
    }


def config_json_quantization(hf_config: dict[str, Any]) -> dict[str, Any]:
    """`config.json["quantization_config"]`: ModelOpt's compressed-tensors-style restatement of the above."""
    details = hf_config["quantization"]
    algo = details["quant_algo"]
    if algo not in (QUANT_ALGO, WEIGHT_ONLY_ALGO):
        raise ValueError(f"unsupported quant_algo {algo!r}")
    group = details.get("group_size", BLOCK)
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group}
    group_0: dict[str, Any] = {} if algo == WEIGHT_ONLY_ALGO else {"input_activations": dict(fp4)}
    group_0.update({"weights": dict(fp4), "targets": ["Linear"]})
    out: dict[str, Any] = {
        "config_groups": {"group_0": group_0},
        "ignore": list(details.get("exclude_modules", [])),
    }
    out["quant_algo"] = algo
    out["producer"] = dict(hf_config["producer"])
    out["quant_method"] = "modelopt"
    return out


def write_quant_configs(folder: Path, config: dict[str, Any], hf_config: dict[str, Any]) -> None:
    """Write `hf_quant_config.json` and `config.json` (with `quantization_config`), indented as ModelOpt does."""
    (folder / HF_QUANT_CONFIG).write_text(json.dumps(hf_config, indent=4))
    data = dict(config)
    data["quantization_config"] = config_json_quantization(hf_config)
    (folder / "config.json").write_text(json.dumps(data, indent=4))


# ---- reading ------------------------------------------------------------------------------------------


def read_modelopt_algo(folder: Path, raw_config: dict[str, Any]) -> str | None:
    """The quant_algo of a ModelOpt checkpoint, from config.json or hf_quant_config.json; None if not ModelOpt."""
    qc = raw_config.get("quantization_config") or (raw_config.get("text_config") or {}).get(
        "quantization_config"
    )
    if isinstance(qc, dict) and qc.get("quant_method") == "modelopt":
        return _algo_of(qc.get("quant_algo"), qc.get("quantized_layers"), folder)
    file = folder / HF_QUANT_CONFIG
    if not qc and file.is_file():
        try:
            details = json.loads(file.read_text()).get("quantization", {})
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
        return _algo_of(details.get("quant_algo"), details.get("quantized_layers"), folder)
    return None


def _algo_of(algo: Any, layers: Any, folder: Path) -> str:
    nvfp4 = (QUANT_ALGO, WEIGHT_ONLY_ALGO)
    if algo in nvfp4:
        return algo
    if algo == "MIXED_PRECISION" and isinstance(layers, dict):
        others = sorted({v.get("quant_algo") for v in layers.values()} - set(nvfp4))
        if not others:
            return algo
        raise CheckpointError(
            f"{folder}: ModelOpt mixed-precision checkpoint uses {others}; only NVFP4 is supported"
        )
    raise CheckpointError(
        f"{folder}: ModelOpt quant_algo {algo!r} is not supported; only NVFP4 and W4A16_NVFP4"
    )


class ModelOptSource(WeightSource):
    """NVFP4 linears as packed `NVFP4Tensor`s (no dense copy); BF16 modules listed in exclude_modules stay dense."""

    format_name = "modelopt-nvfp4"
    packed_suffix = "weight"

    @staticmethod
    def detect(folder: Path, raw_config: dict[str, Any]) -> bool:
        return read_modelopt_algo(folder, raw_config) is not None

    def linear(self, name: str) -> Weight:
        if self.has(f"{name}.weight_scale"):
            weight: Weight = self.nvfp4(name)
        else:
            info = self.reader.info(self.key(f"{name}.weight"))
            if info.dtype in ("U8", "F8_E4M3"):
                raise CheckpointError(f"{info.name} is {info.dtype} but has no weight_scale next to it")
            weight = self.tensor(f"{name}.weight")
        self._consume_extras(name)
        return weight

    def nvfp4(self, name: str) -> NVFP4Tensor:
        key = self.key(name)
        packed = self.raw(f"{name}.{self.packed_suffix}")
        scale = self.raw(f"{name}.weight_scale")
        scale_2 = self.global_scale(name)
        if packed.dtype != torch.uint8 or scale.dtype != torch.float8_e4m3fn:
            raise CheckpointError(
                f"{key}: expected uint8 weights and float8_e4m3fn weight_scale, got {packed.dtype} and {scale.dtype}"
            )
        if packed.dim() != 2 or scale.shape != (packed.shape[0], packed.shape[1] * 2 // BLOCK):
            raise CheckpointError(
                f"{key}: weight {tuple(packed.shape)} and weight_scale {tuple(scale.shape)} do not match "
                f"(expected weight_scale [{packed.shape[0]}, {packed.shape[-1] * 2 // BLOCK}])"
            )
        return NVFP4Tensor(packed, scale, scale_2)

    def global_scale(self, name: str) -> torch.Tensor:
        scale_2 = self.raw(f"{name}.weight_scale_2", dtype=torch.float32)
        if scale_2.numel() != 1:
            raise CheckpointError(
                f"{self.key(name)}.weight_scale_2 must be a scalar, got shape {tuple(scale_2.shape)}"
            )
        return scale_2.reshape(())

    def _consume_extras(self, name: str) -> None:
        # Activation and KV-cache scales matter to W4A4 / FP8-KV engines only; we run W4A16 with a BF16 cache.
        for suffix in ("input_scale", "input_global_scale", *KV_SCALE_SUFFIXES):
            if self.has(f"{name}.{suffix}"):
                self.consumed.add(self.key(f"{name}.{suffix}"))

    def experts(self, name: str) -> tuple[Weight, Weight]:
        if self.has(f"{name}.gate_up_proj"):  # experts left in BF16: transformers' fused layout
            return super().experts(name)
        gate_up, down = [], []
        for e in range(self.cfg.num_experts):
            gate, up, dn = (self.linear(expert_module(name, e, p)) for p in EXPERT_PROJECTIONS)
            names = [self.key(expert_module(name, e, p)) for p in EXPERT_PROJECTIONS[:2]]
            gate_up.append(concat_out([gate, up], names=names))
            down.append(dn)
        return stack_expert_weights(gate_up, self.key(name)), stack_expert_weights(down, self.key(name))

    def describe(self) -> dict[str, Any]:
        return {"format": self.format_name}


def stack_expert_weights(weights: list[Weight], name: str) -> Weight:
    """Per-expert weights as one [E, ...] weight (NVFP4 or dense; a mix is a checkpoint error)."""
    if all(isinstance(w, NVFP4Tensor) for w in weights):
        return stack_experts(weights)
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.stack(weights)
    raise CheckpointError(f"{name}: some experts are NVFP4 and some are not; they cannot be stacked")
