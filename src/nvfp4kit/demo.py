"""The built-in demo model: a 12.8M-parameter Gemma 4 (MoE, K=V global layers) trained for nvfp4kit.

It ships inside the package so every command has something real to run without a download: `bf16` is the
trained checkpoint (transformers' layout), `nvfp4` its export by `nvfp4kit quantize` (ModelOpt's format).
How it was trained: `scripts/train_demo.py` and `assets/demo/training.json`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_FOLDERS = {"bf16": ASSETS / "demo", "nvfp4": ASSETS / "demo-nvfp4"}


def demo_model_path(kind: str = "bf16") -> Path:
    """Folder of the demo checkpoint of `kind` ("bf16" or "nvfp4"), for use as a default MODEL argument."""
    if kind not in DEMO_FOLDERS:
        raise ValueError(f"unknown demo model kind {kind!r}; choose from {', '.join(DEMO_FOLDERS)}")
    folder = DEMO_FOLDERS[kind]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the {kind} demo model is not installed at {folder}; reinstall nvfp4kit, or make it with "
            f"`nvfp4kit quantize {DEMO_FOLDERS['bf16']} {folder}`"
        )
    return folder
