"""The decode-graph path: fixed buffers, padding to a captured batch size, fixed key splits.

CUDA graphs cannot be captured on the CPU, so these tests run `DecodeGraphs(eager=True)`: the same fixed
buffers, padding and launch shapes as a replay, executed eagerly through the Triton kernels (interpreted).
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.engine.batch_context import SeqSlice, StepMetadata
from nvfp4kit.engine.cuda_graphs import DecodeGraphs, default_batch_sizes
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import generate_tokens


def test_default_batch_sizes_cover_every_batch_up_to_the_limit():
    assert default_batch_sizes(1) == (1,)
    assert default_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert default_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert default_batch_sizes(64)[-3:] == (48, 56, 64)
    assert default_batch_sizes(100)[-3:] == (88, 96, 100)
    assert default_batch_sizes(160)[-5:] == (112, 120, 128, 144, 160)


def test_host_tensors_pad_sequences_and_block_tables(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    engine = Engine(load_model(folder), None, config=EngineConfig(block_size=4, num_kv_tokens=64))
    seqs = [SeqSlice(9, 1, 0, [3, 1, 7], 2), SeqSlice(2, 1, 1, [5], 0)]
    per_seq, per_token, starts, lengths = StepMetadata.host_tensors(
        seqs, engine.cache, pad_to=4, max_blocks=6
    )
    meta = StepMetadata.from_tensors(per_seq, per_token, starts, lengths)
    assert meta.batch.seq_len.tolist() == [1, 1, 0, 0]
    assert meta.batch.seq_offset.tolist() == [0, 1, 2, 3]  # padding rows follow the real tokens
    assert meta.batch.block_table.shape == (4, 6)
    assert meta.batch.block_table[0].tolist() == [3, 1, 7, 0, 0, 0]
    assert meta.positions.tolist() == [9, 2, 0, 0]
    assert meta.global_slots.tolist() == [7 * 4 + 1, 5 * 4 + 2, -1, -1]  # padding writes nowhere
    ring = engine.layout.ring_size
    assert meta.ring_slots.tolist() == [2 * ring + 9 % ring, 2, -1, -1]
    with pytest.raises(ValueError, match="exceeds max_blocks=2"):
        StepMetadata.host_tensors(seqs, engine.cache, max_blocks=2)


@pytest.mark.parametrize("kind", ["moe", "e2b"])
def test_padded_decode_graph_path_gives_the_same_tokens(tiny_checkpoint, kind):
    folder = tiny_checkpoint(kind)
    model, tok = load_model(folder), Tokenizer(folder)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 384, (n,), generator=gen).tolist() for n in (13, 3, 6)]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    config = EngineConfig(
        block_size=4, max_num_batched_tokens=32, max_model_len=64, attention_backend="triton"
    )
    expected = generate_tokens(Engine(model, tok, config=config), prompts, greedy)

    engine = Engine(model, tok, config=config)
    engine.graphs = DecodeGraphs(
        model, engine.cache, batch_sizes=(1, 4), max_model_len=64, attention_backend="triton", eager=True
    )
    engine.graphs.capture()
    calls = []
    run = engine.graphs.run
    engine.graphs.run = lambda ids, seqs: calls.append(len(seqs)) or run(ids, seqs)
    assert generate_tokens(engine, prompts, greedy) == expected
    assert calls and set(calls) == {3}  # three decodes a step, padded to the graph of 4
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_rows_of_a_decode_batch_get_zeros_not_stale_memory(tiny_checkpoint, num_splits):
    # a graph replays into memory that held anything; NaN in a padding row would reach the router
    from nvfp4kit.engine.attention_backend import TritonAttentionBackend
    from nvfp4kit.kernels import paged_attention as kernels

    folder = tiny_checkpoint("moe")
    model = load_model(folder)
    engine = Engine(model, None, config=EngineConfig(block_size=4, num_kv_tokens=64))
    engine.add_request(list(range(5, 14)), SamplingParams(max_tokens=2, temperature=0))
    engine.step()
    req = engine.scheduler.running[0]
    seqs = [SeqSlice(req.num_computed - 1, 1, 0, req.block_table, req.ring)]
    meta = StepMetadata.build(seqs, engine.cache, "cpu", pad_to=3)
    cfg = model.config
    for layer in (0, 5):  # sliding ring, global k_eq_v pool
        dim, src = cfg.layer_head_dim(layer), cfg.kv_source_layer(layer)
        q = torch.randn(3, cfg.num_attention_heads, dim)
        out = torch.full_like(q, float("nan"))
        sliding = cfg.is_sliding(layer)
        derived = None
        if engine.cache.keys[src] is None:
            derived = TritonAttentionBackend()._derived_key(model.layers[src].self_attn)
        where = (
            {"ring_size": engine.layout.ring_size} if sliding else {"block_size": engine.layout.block_size}
        )
        kernels.paged_attention(
            q, v_store=engine.cache.values[src], k_store=engine.cache.keys[src], batch=meta.batch,
            items=meta.decode_items(), window=cfg.sliding_window if sliding else None, derived_key=derived,
            num_splits=num_splits, out=out, **where,
        )  # fmt: skip
        assert torch.isfinite(out[0]).all()
        assert torch.equal(out[1:], torch.zeros_like(out[1:]))


def test_rows_reused_by_shorter_sequences_read_only_their_own_blocks(tiny_checkpoint):
    # the long prompt finishes first, so the graph's row 0 then holds a sequence with a shorter block table
    # than the stale one left in the fixed buffer
    folder = tiny_checkpoint("moe")
    model = load_model(folder)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(5, 384, (n,), generator=gen).tolist() for n in (41, 3, 9)]
    lengths = (2, 7, 5)
    config = EngineConfig(
        block_size=4, max_num_batched_tokens=64, max_model_len=64, attention_backend="triton"
    )

    def run(engine):
        ids = {
            engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)): i
            for i, (p, n) in enumerate(zip(prompts, lengths))
        }
        out = [[] for _ in prompts]
        while engine.has_unfinished():
            for event in engine.step():
                out[ids[event.request_id]].append(event.token_id)
        return out

    expected = run(Engine(model, None, config=config))
    engine = Engine(model, None, config=config)
    engine.graphs = DecodeGraphs(
        model, engine.cache, batch_sizes=(1, 2, 4), max_model_len=64, attention_backend="triton", eager=True
    )
    engine.graphs.capture()
    assert run(engine) == expected
    assert [len(t) for t in expected] == list(lengths)


def test_graphs_refuse_an_attention_backend_that_reads_host_lists(tiny_checkpoint):
    """The torch backend takes positions and slots from the step's host lists, which a replay cannot refill: a
    captured graph would replay the capture's (empty) step. The engine runs such a backend eager instead."""
    model = load_model(tiny_checkpoint("moe"))
    engine = Engine(
        model, None, config=EngineConfig(block_size=4, num_kv_tokens=64, attention_backend="torch")
    )
    with pytest.raises(ValueError, match="run eager"):
        DecodeGraphs(
            model, engine.cache, batch_sizes=(1,), max_model_len=64, attention_backend="torch", eager=True
        )
