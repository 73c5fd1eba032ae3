"""Tiny checkpoints the tensor-parallel tests split: float32 (as BF16 checkpoints are read) and our NVFP4 export.

Shapes chosen to split: `moe` and `dense` over 2 ranks (the MLP's 64 and 96 columns give 32 and 48 a rank,
multiples of the NVFP4 block), `moe3` over 3 ranks (6 q heads, 3 sliding KV heads, 1 global KV head that every
rank holds, 8 experts split 3/3/2, 48 MLP columns = 16 a rank).
"""

from __future__ import annotations

import pytest
import torch

SPLITS = {
    "moe": ("moe", {"intermediate_size": 64}),
    "dense": ("dense", {}),
    "moe3": ("moe", {"num_attention_heads": 6, "num_key_value_heads": 3}),
}


@pytest.fixture(scope="session")
def split_checkpoint(tmp_path_factory):
    """Factory: split_checkpoint(name, nvfp4=False) -> folder (read-only, made once per session)."""
    from nvfp4kit.quant import quantize
    from nvfp4kit.testing.tiny import write_tiny_checkpoint

    made = {}

    def make(name: str, nvfp4: bool = False):
        key = (name, nvfp4)
        if key not in made:
            shape, overrides = SPLITS[name]
            if (name, False) not in made:
                folder = tmp_path_factory.mktemp(f"tp_{name}")
                made[name, False] = write_tiny_checkpoint(
                    folder, shape=shape, dtype=torch.float32, **overrides
                )
            if nvfp4:
                calib = tmp_path_factory.mktemp("tp_calib") / "calib.txt"
                calib.write_text(
                    "\n\n".join(f"Note {i}: the river and the lamp ({i * 13 % 97})." for i in range(64))
                )
                out = tmp_path_factory.mktemp(f"tp_{name}_nvfp4") / "out"
                quantize(made[name, False], out, calib_data=[calib], num_samples=4, seq_len=32, progress=False,
                         calib_dtype=torch.float32)  # fmt: skip
                made[key] = out
        return made[key]

    return make
