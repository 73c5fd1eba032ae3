"""Shared by the tensor-parallel tests: a step's logits through any model, and a shard loader that fails."""

from __future__ import annotations

import torch

from nvfp4kit.distributed.loading import load_shard
from nvfp4kit.engine.batch_context import BatchContext, SeqSlice


@torch.inference_mode()
def prefill_then_decode_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of every prompt token (one prefill step of all prompts) and of one decode step after it, through
    `engine.model` over `engine.cache` (blocks and rings taken here and given back)."""
    cache, model = engine.cache, engine.model
    blocks = [cache.allocate_blocks(cache.blocks_for(len(p) + 1)) for p in prompts]
    rings = [cache.allocate_ring() for _ in prompts]
    try:
        seqs, offset = [], 0
        for p, table, ring in zip(prompts, blocks, rings):
            seqs.append(SeqSlice(0, len(p), offset, table, ring))
            offset += len(p)
        ids = torch.tensor([t for p in prompts for t in p])
        prefill = model.logits(model.hidden_states(ids, BatchContext(model, cache, seqs, engine.device)))
        nxt = prefill[torch.tensor([s.offset + s.length - 1 for s in seqs])].argmax(-1)
        decode_seqs = [
            SeqSlice(len(p), 1, i, table, ring)
            for i, (p, table, ring) in enumerate(zip(prompts, blocks, rings))
        ]
        decode = model.logits(
            model.hidden_states(nxt, BatchContext(model, cache, decode_seqs, engine.device))
        )
        return torch.cat([prefill, decode])
    finally:
        for table, ring in zip(blocks, rings):
            cache.free(table, ring)


def failing_loader(path, layout, rank, **options):
    """`load_shard`, except that rank 1's first dense MLP raises at its third call (a step into serving)."""
    model = load_shard(path, layout, rank, **options)
    if rank == 1:
        mlp, calls = model.layers[0].mlp, []

        def forward(x):
            calls.append(1)
            if len(calls) == 3:
                raise ValueError("injected failure")
            return type(mlp).forward(mlp, x)

        mlp.forward = forward
    return model


def cache_dir_loader(path, layout, rank, **options):
    """Rank 1 fails at once, naming the folder it reads the kernels' tuning tables from."""
    if rank == 1:
        from nvfp4kit.kernels.configs import cache_dir

        raise RuntimeError(f"tables in {cache_dir()}")
    return load_shard(path, layout, rank, **options)
