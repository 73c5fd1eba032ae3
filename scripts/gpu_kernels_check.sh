#!/usr/bin/env bash
# GPU correctness for the W4A16 kernels: the CPU test suite run natively on the card (bits and PTX decoders,
# CUDA-graph replays, and every kernel compiled for the SM80 and SM90 targets by this machine's Triton).
# Usage on the GPU machine from the repository root: bash scripts/gpu_kernels_check.sh [LOG_DIR]
set -u -o pipefail
log_dir=${1:-.}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_capability())"
mine="tests/kernels/test_nvfp4_tile.py tests/kernels/test_w4a16_linear.py tests/kernels/test_fused_moe.py
  tests/kernels/test_moe_align.py tests/kernels/test_backend.py tests/kernels/test_bench.py
  tests/kernels/test_compile_targets.py"
python3 -m pytest $mine -q -p no:cacheprovider 2>&1 | tee "$log_dir/pytest_native.log" | tail -3
status=$?
exit $status
