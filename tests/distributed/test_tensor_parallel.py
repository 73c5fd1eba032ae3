"""Tensor/expert parallel on the CPU (gloo, spawned ranks) against the single-process engine."""

import os
import signal
import time
from dataclasses import replace

import pytest
import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.distributed.group import TensorParallelError, TensorParallelGroup
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.plan.parallel import ShardingError
from tests.distributed.helpers import cache_dir_loader, failing_loader, prefill_then_decode_logits
from tests.engine.helpers import generate_tokens, random_prompts

OPTIONS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, prefix_caching=False)


@pytest.mark.parametrize(
    ("name", "nvfp4", "ranks"),
    [("moe", True, 2), ("dense", False, 2), ("dense", True, 2), ("moe3", False, 3)],  # moe3: experts 3/3/2
)
def test_logits_and_greedy_tokens_equal_one_process(split_checkpoint, name, nvfp4, ranks):
    folder = split_checkpoint(name, nvfp4)
    prompts = random_prompts([5, 19, 40], seed=ranks)
    ref = LLM(folder, **OPTIONS)
    tp = LLM(folder, tensor_parallel_size=ranks, **OPTIONS)
    workers = [w.process for w in tp.parallel.workers]
    assert len(workers) == ranks - 1 and all(p.is_alive() for p in workers)
    want = prefill_then_decode_logits(ref.engine, prompts)
    got = prefill_then_decode_logits(tp.engine, prompts)
    assert got.shape == want.shape
    # fp32: only the order of the sums differs (typically 1e-5 of the scale after a few layers; a sharding bug
    # such as a wrong split or a flipped expert choice shows as errors of the scale's own size)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-4 * scale, (
        f"max error {(got - want).abs().max()} at scale {scale}"
    )
    # n=2 on a 40-token prompt: the second sample takes the first's full blocks and a copy of its sliding ring;
    # with the rings copied at prompt ends (prefix_cache.snapshot), the KV copies rank 0 makes outside a forward
    # (mirrored on every rank)
    prefix, copies = tp.engine.scheduler.prefix, []
    mirrored = prefix.copy_ring
    prefix.copy_ring = lambda source, target: (copies.append(target), mirrored(source, target))
    params = [GREEDY, GREEDY, SamplingParams(n=2, max_tokens=8, temperature=0, ignore_eos=True)]
    outs = [[o.token_ids for o in r.outputs] for r in tp.generate(prompts, params, use_tqdm=False)]
    assert outs == [[o.token_ids for o in r.outputs] for r in ref.generate(prompts, params, use_tqdm=False)]
    assert len(copies) >= 2  # the twin's fork and at least one prompt-end copy, equal on every rank (above)
    tp.close()
    assert not any(p.is_alive() for p in workers)  # close() ends the workers
    ref.close()


def test_a_split_that_does_not_fit_is_refused_before_any_process_starts(split_checkpoint):
    with pytest.raises(ShardingError, match="4 attention heads do not split evenly over 3 ranks"):
        LLM(split_checkpoint("moe"), tensor_parallel_size=3, **OPTIONS)


def start(folder, ranks=2, **options):
    group = TensorParallelGroup.start(
        folder, ranks, dtype=torch.float32, device=torch.device("cpu"), timeout_s=20, **options
    )  # a collective that waited on a lost rank would end after 20 s
    engine = Engine(group.model, None, config=CONFIG)
    group.attach(engine)
    return group, engine


def test_images_over_two_ranks_are_refused_before_any_step(tiny_checkpoint):
    """The ranks' forward takes no image embeddings: an image prompt gets a clear error up front (a 400 in the
    server) instead of failing an engine step and every request in it; text keeps working."""
    from tests.vision.conftest import random_image

    folder = tiny_checkpoint("dense", multimodal=True, vision=True)
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    with LLM(folder, tensor_parallel_size=2, **OPTIONS) as llm:
        image_prompt = {"prompt": "What is <|image|>?", "multi_modal_data": {"image": random_image(32, 32)}}
        with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
            llm.generate(["Hi", image_prompt], greedy, use_tqdm=False)
        [out] = llm.generate("Hi", greedy, use_tqdm=False)
        assert len(out.token_ids) == 3


def test_a_rank_that_raises_ends_the_group_with_its_error(split_checkpoint):
    group, engine = start(split_checkpoint("moe"), loader=failing_loader)
    workers = [w.process for w in group.workers]
    with pytest.raises(TensorParallelError, match="rank 1 failed: ValueError: injected failure"):
        generate_tokens(engine, random_prompts([6, 6]), GREEDY)
    assert not any(p.is_alive() for p in workers)
    with pytest.raises(TensorParallelError, match="group has ended: rank 1 failed"):
        generate_tokens(engine, random_prompts([6]), GREEDY)


def test_every_rank_reads_the_tuning_tables_of_rank_0(split_checkpoint, tmp_path, monkeypatch):
    """`LLM(kernel_cache_dir=)` / `serve --kernel-cache-dir` set the folder in rank 0's process only; the spawned
    ranks read the same one, not $NVFP4KIT_CACHE_DIR's."""
    from nvfp4kit.kernels import configs

    monkeypatch.setenv("NVFP4KIT_CACHE_DIR", str(tmp_path / "from-env"))
    configs.set_cache_dir(tmp_path / "given")
    try:
        with pytest.raises(TensorParallelError, match=f"tables in {tmp_path / 'given'}"):
            start(split_checkpoint("moe"), loader=cache_dir_loader)
    finally:
        configs.set_cache_dir(None)


def test_a_killed_rank_is_reported_by_the_watchdog(split_checkpoint):
    group, engine = start(split_checkpoint("moe"))
    generate_tokens(engine, random_prompts([6]), GREEDY)
    os.kill(group.workers[0].process.pid, signal.SIGKILL)
    while group.failure is None:  # the watchdog looks every 0.2 s
        time.sleep(0.05)
    with pytest.raises(TensorParallelError, match="rank 1 was killed by signal 9"):
        generate_tokens(engine, random_prompts([6]), GREEDY)
    group.close()


def test_decode_graphs_replay_on_every_rank_in_step(split_checkpoint):
    """Decode graphs under TP (distributed/graphs.py): every rank captures its graphs over its shard, and each
    replay is announced, so all ranks refill their fixed buffers from the same sequences and run the captured
    step together. On the CPU the graphs are eager (same buffers, padding and launch shapes) over gloo: the
    tokens are those of one process without graphs, and the decode steps go through the graphs."""
    from nvfp4kit.distributed.graphs import ParallelDecodeGraphs
    from nvfp4kit.model.loader import load_model

    folder = split_checkpoint("moe", True)
    config = replace(CONFIG, attention_backend="triton", graph_batch_sizes=(1, 2, 4))
    group = TensorParallelGroup.start(
        folder, 2, dtype=torch.float32, device=torch.device("cpu"), timeout_s=60
    )
    try:
        engine = Engine(group.model, None, config=config)
        group.attach(engine)
        engine.capture_decode_graphs(eager=True)
        assert isinstance(engine.graphs, ParallelDecodeGraphs)
        replays = []
        run = engine.graphs.run
        engine.graphs.run = lambda ids, seqs: replays.append(len(seqs)) or run(ids, seqs)
        prompts = random_prompts([9, 4, 13])
        got = generate_tokens(engine, prompts, GREEDY)
    finally:
        group.close()
    assert replays and max(replays) == 3  # three sequences decoding, padded to the graph of 4
    one = Engine(load_model(folder, dtype=torch.float32), None, config=config)
    assert got == generate_tokens(one, prompts, GREEDY)


def test_random_weights_cut_per_rank_equal_the_whole_random_model(tmp_path):
    """bench engine --tensor-parallel-size without a checkpoint: every rank cuts its part of the same random
    model (the path the GPU benchmark takes)."""
    import functools

    from nvfp4kit.testing.random_llm import random_shard, write_random_folder
    from nvfp4kit.testing.random_model import random_model

    cfg = write_random_folder("tiny-dense", tmp_path)
    loader = functools.partial(random_shard, quantized=True)
    group, engine = start(tmp_path, loader=loader, quantized=True)
    prompts = random_prompts([7, 12])
    got = generate_tokens(engine, prompts, GREEDY)
    group.close()
    whole = random_model(cfg, quantized=True, dtype=torch.float32, device="cpu")
    assert got == generate_tokens(Engine(whole, None, config=CONFIG), prompts, GREEDY)


def test_random_llm_over_two_ranks_generates_what_one_process_does():
    """`serve --random-weights SHAPE --tensor-parallel-size 2` (RandomLLM): both ranks build the seeded model and
    keep their cuts, so TP 2 decodes the tokens of TP 1 on the same weights."""
    from nvfp4kit.testing.random_llm import RandomLLM

    prompts = ["The quick brown fox", "one two"]
    with RandomLLM(
        "tiny-dense", dtype="float32", weights_seed=3, tensor_parallel_size=2, engine_config=CONFIG
    ) as llm:
        assert llm.parallel is not None and llm.parallel.layout.world == 2
        got = [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]
    with RandomLLM("tiny-dense", dtype="float32", weights_seed=3, engine_config=CONFIG) as llm:
        assert got == [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]


def test_eval_over_two_ranks_scores_as_one_process(split_checkpoint):
    """eval --tensor-parallel-size: each model in its own group, one after the other (whole windows from an
    empty contiguous cache on every rank)."""
    from nvfp4kit.distributed.group import sequential_loader
    from nvfp4kit.eval.compare import compare_checkpoints

    ref, quant = split_checkpoint("moe"), split_checkpoint("moe", True)
    samples = random_prompts([24, 24, 24], seed=5)
    load = sequential_loader(2)
    try:
        tp = compare_checkpoints(ref, quant, samples, load=load, low_memory=True)
    finally:
        load.close()
    one = compare_checkpoints(ref, quant, samples)
    assert tp.agreement.top1_agreement == one.agreement.top1_agreement
    assert tp.agreement.kl_mean == pytest.approx(one.agreement.kl_mean, rel=1e-4)
    assert tp.agreement.ppl_quant == pytest.approx(one.agreement.ppl_quant, rel=1e-5)


def test_moe_split_by_width_gives_the_logits_of_one_process(split_checkpoint):
    """moe="tensor": every rank runs every routed expert on its slice of the MoE width (the alternative to
    expert parallel that the GPU benchmark compares)."""
    from nvfp4kit.model.loader import load_model

    folder = split_checkpoint("moe", True)
    group, engine = start(folder, moe="tensor")
    assert group.layout.local_config().moe_intermediate_size == 16
    prompts = random_prompts([9, 4], seed=7)
    got = prefill_then_decode_logits(engine, prompts)
    group.close()
    want = prefill_then_decode_logits(Engine(load_model(folder), None, config=CONFIG), prompts)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
