"""K/V stored by the kernel that computes them (`qkv_norm_rope` with a `KVSink`) instead of a separate write.

With the Triton op and attention backends (interpreted here), the fused store must leave the same bytes in
every pool and give the same tokens and logprobs as the separate `write_kv` launch; steps whose sliding layers
run in passes keep the separate write for those layers.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.engine.attention_backend import FUSED_KV_WRITE_VAR
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.kernels import kv_write
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import random_prompts

PARAMS = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=0)


def _run(folder, monkeypatch, *, fused: bool, kv_dtype: str, sliding_chunk: int | None):
    monkeypatch.setenv(FUSED_KV_WRITE_VAR, "1" if fused else "0")
    model = load_model(folder, dtype=torch.bfloat16)
    model.set_backend(TritonBackend())
    config = EngineConfig(kv_dtype=kv_dtype, max_num_batched_tokens=16, block_size=4, attention_backend="triton",
                          sliding_chunk=sliding_chunk)  # fmt: skip
    engine = Engine(model, Tokenizer(folder), config=config)
    calls = 0
    real = kv_write.write_kv

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_write, "write_kv", counting)
    ids = {engine.add_request(p, PARAMS): i for i, p in enumerate(random_prompts([11, 3], seed=7))}
    out: list[list[tuple[int, float]]] = [[] for _ in ids]
    while engine.has_unfinished():
        for e in engine.step():
            out[ids[e.request_id]].append((e.token_id, e.logprob))
    pools = [p.clone() for p in (*engine.cache.keys.values(), *engine.cache.values.values()) if p is not None]
    return out, pools, calls


# k_eq_v global layers storing V only (moe), KV-shared layers (e2b); FP8 and BF16 pools; sliding layers in passes
@pytest.mark.parametrize(
    "shape,kv_dtype,sliding_chunk", [("moe", "fp8_e4m3", None), ("e2b", "bf16", None), ("moe", "fp8_e4m3", 5)]
)
def test_fused_store_leaves_the_same_bytes_and_tokens(
    tiny_checkpoint, monkeypatch, shape, kv_dtype, sliding_chunk
):
    folder = tiny_checkpoint(shape)
    fused, fused_pools, fused_calls = _run(
        folder, monkeypatch, fused=True, kv_dtype=kv_dtype, sliding_chunk=sliding_chunk
    )
    plain, plain_pools, plain_calls = _run(
        folder, monkeypatch, fused=False, kv_dtype=kv_dtype, sliding_chunk=sliding_chunk
    )
    assert fused == plain
    assert all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(fused_pools, plain_pools)
    )
    assert plain_calls > 0 and fused_calls < plain_calls
    if sliding_chunk is None:
        assert fused_calls == 0  # every layer's K/V came out of qkv_norm_rope
