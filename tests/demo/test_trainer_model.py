"""The demo trainer's own Gemma 4 (scripts/demo_model.py: batched, trainable) keeps the package model's math.

The package model is for inference (weights are buffers, NVFP4 or dense; one flat token batch with a KV
context), so the trainer keeps a second definition; this runs its selfcheck: random weights with sharpened
norms and router, saved as a checkpoint, loaded by nvfp4kit, logits equal within 1e-3.
"""

import os
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "scripts" / "train_demo.py"


def test_trainer_model_equals_the_package_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(TRAINER), "selfcheck"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max |logit difference| trainer vs nvfp4kit" in done.stdout
