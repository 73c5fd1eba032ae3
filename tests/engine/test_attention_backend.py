"""The attention backends: selection, and the Triton path (interpreted on the CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.engine.attention_backend import (
    ENV_VAR,
    TorchAttentionBackend,
    TritonAttentionBackend,
    register_attention_backend,
    select_attention_backend,
)
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice, StepMetadata
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import GREEDY, generate_tokens, random_prompts


@pytest.fixture(scope="module", params=["moe", "e2b"])
def model_and_tokenizer(request, tiny_checkpoint):
    folder = tiny_checkpoint(request.param)
    return load_model(folder), Tokenizer(folder)


def test_backend_chosen_by_device_unless_overridden(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert isinstance(select_attention_backend("cpu"), TorchAttentionBackend)
    assert isinstance(select_attention_backend(torch.device("cuda", 0)), TritonAttentionBackend)
    assert isinstance(select_attention_backend("cpu", "triton"), TritonAttentionBackend)
    monkeypatch.setenv(ENV_VAR, "triton")
    assert isinstance(select_attention_backend("cpu"), TritonAttentionBackend)
    assert isinstance(select_attention_backend("cpu", "torch"), TorchAttentionBackend)
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'flash'; available: \['torch', 'triton'"
    ):
        select_attention_backend("cpu", "flash")


class ComparingBackend:
    """Runs the torch reference and the Triton path on the same cache state; records the largest differences."""

    name = "compare"
    needs_metadata = True

    def __init__(self):
        self.triton = TritonAttentionBackend()
        self.max_out_error = 0.0
        self.max_cache_error = 0.0
        self.calls = 0

    def attend(self, ctx, layer, q, k, v, *, window):
        pools = [*ctx.cache.keys.values(), *ctx.cache.values.values()]
        pools = [p for p in pools if p is not None]
        before = [p.clone() for p in pools]
        ref = ctx.attend_reference(layer, q, k, v, window=window)
        ref_pools = [p.clone() for p in pools]
        for pool, saved in zip(pools, before):
            pool.copy_(saved)
        out = self.triton.attend(ctx, layer, q, k, v, window=window)
        self.calls += 1
        self.max_out_error = max(self.max_out_error, float((out - ref).abs().max() / ref.abs().max()))
        for pool, expected in zip(pools, ref_pools):
            self.max_cache_error = max(
                self.max_cache_error, float((pool.float() - expected.float()).abs().max())
            )
        return ref


@pytest.mark.parametrize("kv_dtype", ["float32", "fp8_e4m3"])
def test_triton_attention_equals_reference_in_every_layer_and_step(
    model_and_tokenizer, kv_dtype, monkeypatch
):
    model, tok = model_and_tokenizer
    compare = ComparingBackend()
    register_attention_backend("compare", lambda: compare)
    monkeypatch.setenv(ENV_VAR, "compare")
    # window 8, chunks of 6: a prompt two windows long, chunked prefill next to decodes, k_eq_v (moe),
    # KV-shared layers (e2b), GQA 2:1 (sliding) and 4:1 (global)
    engine = Engine(
        model, tok, config=EngineConfig(kv_dtype=kv_dtype, max_num_batched_tokens=6, block_size=4)
    )
    generate_tokens(
        engine, random_prompts([17, 3], seed=1), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    )
    assert compare.calls > 30
    assert compare.max_out_error < 1e-4, compare.max_out_error
    assert compare.max_cache_error == 0.0


@pytest.mark.parametrize("kv_dtype, budget", [("float32", None), ("fp8_e4m3", None), ("float32", 1)])
def test_prerotated_keys_in_long_prefill_steps_equal_reference(
    tiny_checkpoint, kv_dtype, budget, monkeypatch
):
    """Long prefill steps write the rotated key columns once a layer and attend with them; a scratch past the
    layout's budget (`KVLayout.rotated_keys_budget`, here 1 byte) keeps the in-kernel derivation. Same outputs."""
    import dataclasses

    from nvfp4kit.kernels import rotated_keys

    folder = tiny_checkpoint("moe")  # k_eq_v global layers: K derived from V
    model, tok = load_model(folder), Tokenizer(folder)
    compare = ComparingBackend()
    register_attention_backend("compare", lambda: compare)
    monkeypatch.setenv(ENV_VAR, "compare")
    monkeypatch.setattr(rotated_keys, "PREROTATE_MIN_KEYS", 10)  # every prefill step past 10 keys
    rotations = []
    real = rotated_keys.rotate_derived_keys
    monkeypatch.setattr(
        rotated_keys,
        "rotate_derived_keys",
        lambda *a, **kw: rotations.append(kw["total_rows"]) or real(*a, **kw),
    )
    engine = Engine(
        model, tok, config=EngineConfig(kv_dtype=kv_dtype, max_num_batched_tokens=6, block_size=4)
    )
    if budget is not None:
        engine.cache.layout = dataclasses.replace(engine.cache.layout, rotated_keys_budget=budget)
    generate_tokens(
        engine, random_prompts([17, 3], seed=1), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    )
    if budget is None:
        assert rotations and min(rotations) >= 10  # chunks 2 and 3 of the long prompt, once per global layer
    else:
        assert not rotations
    assert compare.calls > 0
    assert compare.max_out_error < 1e-4, compare.max_out_error


def test_engine_greedy_tokens_equal_with_triton_attention(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    reqs = random_prompts(
        [13, 4], seed=2
    )  # longer than the window (8), prefilled in two chunks beside a decode
    monkeypatch.delenv(ENV_VAR, raising=False)
    config = EngineConfig(max_num_batched_tokens=8, block_size=4, attention_backend="torch")
    expected = generate_tokens(Engine(model, tok, config=config), reqs)
    engine = Engine(
        model, tok, config=EngineConfig(max_num_batched_tokens=8, block_size=4, attention_backend="triton")
    )
    assert generate_tokens(engine, reqs) == expected
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_padded_decode_metadata_gives_the_same_rows(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    model, tok = load_model(folder), Tokenizer(folder)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=32, block_size=4))
    for p in random_prompts([17, 9], seed=3):
        engine.add_request(p, GREEDY)
    engine.step()  # both prompts now in the cache
    seqs = [
        SeqSlice(r.num_computed, 1, i, r.block_table, r.ring) for i, r in enumerate(engine.scheduler.running)
    ]
    triton = TritonAttentionBackend()
    cfg = model.config
    for layer in (0, 5):  # a sliding layer (ring) and the k_eq_v global layer (derived K)
        heads, dim = cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
        gen = torch.Generator().manual_seed(layer)
        q = torch.randn(2, cfg.num_attention_heads, dim, generator=gen)
        kv = torch.randn(2, heads, dim, generator=gen)
        window = cfg.sliding_window if cfg.is_sliding(layer) else None
        plain = BatchContext(model, engine.cache, seqs, "cpu", backend=triton)
        expected = triton.attend(plain, layer, q, kv, kv, window=window)
        padded = BatchContext(model, engine.cache, seqs, "cpu", backend=triton)
        padded._metadata = StepMetadata.build(seqs, engine.cache, "cpu", pad_to=5)
        assert padded.metadata.global_slots.tolist()[2:] == [-1, -1, -1]
        q_pad, kv_pad = (
            torch.cat([q, torch.zeros(3, *q.shape[1:])]),
            torch.cat([kv, torch.zeros(3, heads, dim)]),
        )
        out = triton.attend(padded, layer, q_pad, kv_pad, kv_pad, window=window)
        assert torch.equal(out[:2], expected)
