"""The Triton KV write and paged-attention kernels at 26B-A4B's head shapes on the card (was
scripts/gpu_attention_check.py; `scripts/gpu_attention_bench.py` times the same kernels).

Sliding layers: 16 query heads over 8 KV heads, head_dim 256, window 1024. Global layers: 16 over 2, head_dim
512, K derived from the stored V (k_eq_v), proportional RoPE. Decode of several sequences of different
lengths in one launch (up to 128K context) and a 4K prefill in 2K chunks, BF16 and FP8 E4M3 pools. Each
output is compared with fp32 math on the same stored values; the bound is 5x bf16's own rounding.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from nvfp4kit.tuning.cases import rel_error

pytestmark = pytest.mark.cuda

COMMON = Path(__file__).resolve().parents[2] / "scripts" / "gpu_attention_common.py"
BOUND = 1e-2  # relative L2 error against fp32 math; bf16 rounding of the output alone is ~2e-3


@pytest.fixture(scope="module")
def common():
    """The shapes, the KV pool with random history and its fp32 reference, shared with the benchmark script."""
    spec = importlib.util.spec_from_file_location("gpu_attention_common", COMMON)
    module = sys.modules["gpu_attention_common"] = importlib.util.module_from_spec(
        spec
    )  # for its dataclasses
    spec.loader.exec_module(module)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth must be fp32
    yield module
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.cuda.empty_cache()


def write_step(pool, i: int, positions: torch.Tensor, gen: torch.Generator) -> None:
    """This step's K/V rows through the write kernel; the stored bytes must equal torch's conversion."""
    shape = pool.shape
    k = torch.randn(len(positions), shape.kv_heads, shape.head_dim, device="cuda", generator=gen).bfloat16()
    v = torch.randn(len(positions), shape.kv_heads, shape.head_dim, device="cuda", generator=gen).bfloat16()
    pool.write(i, positions, k, v)
    slots = pool.slots(i, positions)
    assert torch.equal(pool.v_store[slots].view(torch.uint8), v.to(pool.dtype).view(torch.uint8))
    if pool.k_store is not None:
        assert torch.equal(pool.k_store[slots].view(torch.uint8), k.to(pool.dtype).view(torch.uint8))


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize(
    ("layer", "contexts"),
    [("SLIDING", [77, 1024, 1025, 32768, 131072]), ("GLOBAL", [77, 1024, 32768, 131072])],
)
def test_decode_of_sequences_of_different_lengths(common, layer, contexts, kv):
    shape = getattr(common, layer)
    gen = torch.Generator(device="cuda").manual_seed(1)
    pool = common.Pool(shape, common.KV_DTYPES[kv], contexts, seed=2)
    for i, c in enumerate(contexts):
        write_step(pool, i, torch.tensor([c - 1], device="cuda"), gen)
    q = common.random_queries(shape, len(contexts), gen)
    batch, items = pool.metadata([c - 1 for c in contexts], [1] * len(contexts))
    out = pool.attend(q, batch, items, out=torch.full_like(q, float("nan")))
    for i, c in enumerate(contexts):
        truth = pool.reference(i, q[i : i + 1], c - 1, torch.float32)
        assert rel_error(out[i : i + 1], truth) < BOUND, f"context {c}"


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("layer", ["SLIDING", "GLOBAL"])
def test_chunked_prefill(common, layer, kv, total=4096, chunk=2048):
    shape = getattr(common, layer)
    gen = torch.Generator(device="cuda").manual_seed(3)
    pool = common.Pool(shape, common.KV_DTYPES[kv], [total], chunk=chunk, seed=4)
    for start in range(0, total, chunk):
        positions = torch.arange(start, start + chunk, device="cuda")
        write_step(pool, 0, positions, gen)
        q = common.random_queries(shape, chunk, gen)
        batch, items = pool.metadata([start], [chunk])
        out = pool.attend(q, batch, items, out=torch.full_like(q, float("nan")))
        truth = pool.reference(0, q, start, torch.float32)
        assert rel_error(out, truth) < BOUND, f"chunk at {start}"
