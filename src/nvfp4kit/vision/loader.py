"""Strict loading of `model.vision_tower.*` and `model.embed_vision.*` into `VisionTower`.

The tower stays in the dtype the caller asks for (the checkpoint keeps it BF16 even when the text tower is
NVFP4). Missing, mis-shaped or unexpected vision tensors are errors that name them; audio tensors are left alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nvfp4kit.formats.safetensors_io import CheckpointError, CheckpointReader
from nvfp4kit.model.ops import OpBackend
from nvfp4kit.vision.config import MultimodalConfig, load_multimodal_config
from nvfp4kit.vision.tower import ClippedLinear, VisionTower

TOWER, PROJECTOR = "model.vision_tower.", "model.embed_vision."


def tower_targets(tower: VisionTower) -> dict[str, tuple[object, str, tuple[int, ...]]]:
    """Checkpoint name -> (module, attribute, shape) for every tensor the tower takes."""
    cfg = tower.config
    out: dict[str, tuple[object, str, tuple[int, ...]]] = {
        TOWER + "patch_embedder.input_proj.weight": (tower.input_proj, "weight", _shape(tower.input_proj)),
        TOWER + "patch_embedder.position_embedding_table": (
            tower, "position_embedding_table", tuple(tower.position_embedding_table.shape),
        ),
        PROJECTOR + "embedding_projection.weight": (tower.projection, "weight", _shape(tower.projection)),
    }  # fmt: skip
    if cfg.standardize:
        out[TOWER + "std_bias"] = (tower, "std_bias", (cfg.hidden_size,))
        out[TOWER + "std_scale"] = (tower, "std_scale", (cfg.hidden_size,))
    for i, layer in enumerate(tower.layers):
        p = f"{TOWER}encoder.layers.{i}."
        for name, module in layer.named_modules():
            if isinstance(module, ClippedLinear):
                out[f"{p}{name}.linear.weight"] = (module.linear, "weight", _shape(module.linear))
                if cfg.use_clipped_linears:
                    for bound in ("input_min", "input_max", "output_min", "output_max"):
                        out[f"{p}{name}.{bound}"] = (module, bound, ())
            elif hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter):
                out[f"{p}{name}.weight"] = (module, "weight", tuple(module.weight.shape))
    return out


def set_tower_tensor(module: object, attr: str, tensor: torch.Tensor) -> None:
    """Put one checkpoint tensor where `tower_targets` says it goes."""
    if attr == "weight" and hasattr(module, "set_weight"):
        module.set_weight(tensor)
    elif isinstance(getattr(module, attr), torch.nn.Parameter):
        getattr(module, attr).data = tensor
    else:
        setattr(module, attr, tensor)


def _shape(linear) -> tuple[int, int]:
    return (linear.out_features, linear.in_features)


def load_vision_tower(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    backend: OpBackend | None = None,
    config: MultimodalConfig | None = None,
) -> VisionTower | None:
    """The checkpoint's vision tower + projector, or None when its config has no `vision_config`."""
    folder = Path(path)
    config = config or load_multimodal_config(folder)
    if config is None:
        return None
    tower = VisionTower(config.vision, config.text_hidden_size, backend=backend)
    reader = CheckpointReader(folder)
    try:
        targets = tower_targets(tower)
        for name, (module, attr, shape) in targets.items():
            # clip bounds stay fp32: a bf16 bound would move the clamp point
            want = torch.float32 if attr.endswith(("_min", "_max")) else dtype
            tensor = reader.get(name, dtype=want, device=device)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            set_tower_tensor(module, attr, tensor)
        # clip bounds of a config without use_clipped_linears are ignored, as transformers ignores them
        bounds = ("input_min", "input_max", "output_min", "output_max")
        unexpected = [
            n
            for n in reader.names()
            if n.startswith((TOWER, PROJECTOR)) and n not in targets and not n.endswith(bounds)
        ]
        if unexpected:
            raise CheckpointError(f"{folder}: unexpected vision tensors {sorted(unexpected)[:10]}")
    finally:
        reader.close()
    return tower.to(device)  # tensors are already in `dtype`; RoPE frequencies and clip bounds stay fp32
