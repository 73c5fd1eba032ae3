import os

import torch

# Triton kernels are checked on the CPU through the interpreter (tiny shapes); must be set before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
