#!/usr/bin/env bash
# GPU correctness for the W4A16 kernels: the CPU test suite run natively on the card (bits and PTX decoders,
# CUDA-graph replays), then again with Triton forced to compile for SM80 (the generic Ampere code path).
# Usage on the GPU machine from the repository root: bash scripts/gpu_kernels_check.sh [LOG_DIR]
set -u -o pipefail
log_dir=${1:-.}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_capability())"
python3 -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$log_dir/pytest_native.log" | tail -3
status=$?
TRITON_OVERRIDE_ARCH=sm80 python3 - <<'PY'
import torch, triton
from nvfp4kit.bench.cases import random_nvfp4
from nvfp4kit.kernels import LinearConfig, w4a16_linear
w = random_nvfp4(256, 512)
x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
cfg = LinearConfig("dot", 128, 128, 64, num_warps=8)
y = w4a16_linear(x, w, config=cfg)
ref = x.float() @ w.dequantize(torch.float32).T
err = float((y.float() - ref).norm() / ref.norm())
from nvfp4kit.kernels import w4a16_linear as _  # noqa
from nvfp4kit.kernels.w4a16_linear import _w4a16_dot_kernel
try:
    ptx = [k.asm["ptx"] for k in _w4a16_dot_kernel.device_caches[0][0].values()]
except Exception as exc:  # the cache layout differs between Triton versions
    print("could not read the compiled PTX:", exc)
    ptx = []
targets = sorted({line.split()[1] for p in ptx for line in p.splitlines() if line.startswith(".target")})
print(f"forced sm80: rel error {err:.2e}, ptx targets {targets}, wgmma in ptx: {any('wgmma' in p for p in ptx)}")
PY
if [ "${SM80_TESTS:-1}" = 1 ]; then
  TRITON_OVERRIDE_ARCH=sm80 python3 -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$log_dir/pytest_sm80.log" | tail -3
fi
exit $status
