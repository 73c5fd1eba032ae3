#!/usr/bin/env bash
# Download into .whl/ the pure-Python wheels `nvfp4kit serve` needs that the lent GPU image lacks (it has no
# network), for Python 3.12 x86-64: pass `carry: [".whl"]` to the device call, and scripts/gpu_serve_bench.sh
# installs them there into /tmp/site when fastapi/uvicorn are missing (.gitignore keeps .whl/ out of commits).
# Versions as last run on the device.
# Usage from the repository root (a machine with network): bash scripts/fetch_serve_wheels.sh
set -eu -o pipefail
mkdir -p .whl
for pkg in fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 uvicorn==0.55.0 opentelemetry-api==1.45.3 typing_extensions==4.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls .whl
