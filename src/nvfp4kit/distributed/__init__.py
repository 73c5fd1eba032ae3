"""Tensor and expert parallel serving over torch.distributed: one process per device, rank 0 the engine.

`LLM(path, tensor_parallel_size=N)` (and `--tensor-parallel-size N` on serve, generate, eval and bench engine)
starts ranks 1..N-1 as spawned processes (`group.py`); rank 0 is the caller's process and owns the scheduler,
the sampler and the API. Each rank holds a shard (`loading.py`, rules in `plan/parallel.py`): attention by
heads, the dense MLP by columns/rows, MoE experts by expert, embeddings and lm_head by vocab rows. The model
definition is the single-process one; its collectives (`model/ops.py: Collectives`) come from
`collectives.py`. See docs/parallel.md.
"""
