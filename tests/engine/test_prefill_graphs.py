"""The prefill-graph path: steps that prefill replayed from fixed buffers padded to a captured token count.

CUDA graphs cannot be captured on the CPU, so these tests run `PrefillGraphs(eager=True)`: the same fixed
buffers, padding (tokens, sequence slots, work items) and launch shapes as a replay, executed eagerly through the
Triton kernels (interpreted). What a user relies on: the same tokens as the eager engine, for prompts that
arrive while others decode and for steps that fall back to the eager path.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.engine.batch_context import SeqSlice, work_item_pairs
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.prefill_graphs import PrefillGraphs
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams

from .helpers import random_prompts

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint("moe"))


def _config(**extra) -> EngineConfig:
    base = dict(
        block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, attention_backend="triton"
    )
    return EngineConfig(**{**base, **extra})


def _run(engine: Engine, prompts: list[list[int]], arrivals: dict[int, int]) -> dict[str, list[int]]:
    """Prompt i joins at step arrivals.get(i, 0); the tokens of every request."""
    tokens: dict[str, list[int]] = {}
    step = 0
    pending = dict(enumerate(prompts))
    while pending or engine.has_unfinished():
        for i in [i for i in pending if arrivals.get(i, 0) <= step]:
            engine.add_request(pending.pop(i), GREEDY, request_id=f"r{i}")
        for event in engine.step():
            tokens.setdefault(event.request_id, []).append(event.token_id)
        step += 1
        assert step < 200
    return tokens


def test_work_items_cover_each_sequence_once():
    seqs = [SeqSlice(5, 1, 0, [1], 0), SeqSlice(0, 9, 1, [2, 3, 4], 1), SeqSlice(7, 1, 10, [5, 6], 2)]
    lengths = [s.length for s in seqs]
    assert work_item_pairs(lengths, 1) == [(0, 0), (2, 0)]
    assert work_item_pairs(lengths, 4) == [(1, 0), (1, 4), (1, 8)]


def test_fill_pads_tokens_slots_and_items(model):
    engine = Engine(model, None, config=_config())
    graphs = PrefillGraphs(
        model, engine.cache, token_counts=(16, 32), max_seqs=4, max_model_len=64, attention_backend="triton",
        eager=True,
    )  # fmt: skip
    graphs.capture()
    seqs = [SeqSlice(8, 1, 0, [1, 2, 3], 0), SeqSlice(0, 11, 1, [4, 5, 6], 1)]
    g = graphs.fill(list(range(12)), seqs, [0, 11])
    assert g.tokens == 16  # the smallest count >= 12
    assert g.input_ids.tolist() == list(range(12)) + [0] * 4
    assert g.per_token[1, 12:].tolist() == [-1] * 4 and g.per_token[2, 12:].tolist() == [-1] * 4
    slots = graphs.slots
    assert g.per_seq[slots : 2 * slots].tolist() == [
        1,
        11,
        0,
        0,
        0,
    ]  # query lengths; the padding slots are empty
    assert g.per_seq[3 * slots - 1] == 16  # the empty slot's row is past the step's rows
    decode = g.items[1]
    assert decode[0].tolist() == [0, slots - 1, slots - 1, slots - 1, slots - 1]
    tiles = next(b for q, b in g.items.items() if q > 1)
    assert tiles[0, 0] == 1 and set(tiles[0, 1:].tolist()) <= {1, slots - 1}
    assert g.sample_rows.tolist() == [0, 11, 0, 0, 0]
    assert graphs.fits(seqs, 12)
    assert not graphs.fits(seqs, 33)  # more tokens than the largest graph
    assert not graphs.fits(seqs + [SeqSlice(0, 1, 12, [7], 2)] * 3, 15)  # more sequences than slots


@pytest.mark.parametrize("kind", ["moe", "e2b"])  # e2b: layers reading earlier layers' KV, per-layer inputs
def test_prompts_joining_running_decodes_give_the_eager_tokens(tiny_checkpoint, kind):
    model = load_model(tiny_checkpoint(kind))
    prompts = random_prompts([13, 5, 9, 20, 7], seed=8)
    arrivals = {2: 2, 3: 3, 4: 5}
    expected = _run(Engine(model, None, config=_config()), prompts, arrivals)

    engine = Engine(model, None, config=_config(prefill_graphs=(8, 32)))
    assert engine.prefill_graphs is None  # on the CPU nothing is captured unless asked for the eager path
    engine.capture_prefill_graphs(eager=True)
    calls = []
    run = engine.prefill_graphs.run
    engine.prefill_graphs.run = lambda ids, seqs, rows: (
        calls.append((len(ids), len(seqs))) or run(ids, seqs, rows)
    )
    assert _run(engine, prompts, arrivals) == expected
    assert any(n > 1 for _, n in calls), "no step prefilled beside a running decode"
    assert engine.step_stats.steps["prefill_graph"] == len(calls) > 0
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_steps_the_graphs_cannot_take_run_eagerly_with_the_same_tokens(model):
    # a 40-token prompt: its first step (32 tokens) exceeds the 16-token graph, its second (8) replays one;
    # with prompt logprobs a step always runs eagerly
    prompts = random_prompts([40, 6], seed=9)
    expected = _run(Engine(model, None, config=_config()), prompts, {})
    engine = Engine(model, None, config=_config(prefill_graphs=(16,)))
    engine.capture_prefill_graphs(eager=True)
    assert _run(engine, prompts, {}) == expected
    assert engine.step_stats.steps["prefill"] >= 1 and engine.step_stats.steps["prefill_graph"] >= 1

    with_logprobs = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1)
    before = engine.step_stats.steps["prefill_graph"]
    engine.add_request(prompts[1], with_logprobs)
    while engine.has_unfinished():
        engine.step()
    assert engine.step_stats.steps["prefill_graph"] == before


def test_prefill_graphs_need_a_metadata_backend(model):
    engine = Engine(model, None, config=_config(attention_backend="torch"))
    with pytest.raises(ValueError, match="triton"):
        PrefillGraphs(model, engine.cache, token_counts=(16,), max_seqs=4, max_model_len=64, eager=True,
                      attention_backend="torch")  # fmt: skip
    if torch.cuda.is_available():  # pragma: no cover - the CPU suite
        return
    with pytest.raises(ValueError, match="CUDA"):
        PrefillGraphs(model, engine.cache, token_counts=(16,), max_seqs=4, max_model_len=64)


def test_counts_past_the_step_budget_are_not_captured(model):
    engine = Engine(model, None, config=_config(prefill_graphs=(16, 64)))  # 32 tokens a step
    engine.capture_prefill_graphs(eager=True)
    assert engine.prefill_graphs.token_counts == (16,)
    over = Engine(model, None, config=_config(prefill_graphs=(64,)))
    over.capture_prefill_graphs(eager=True)
    assert over.prefill_graphs is None


def test_a_turn_that_reuses_cached_blocks_gives_the_eager_tokens(model):
    # the second turn starts after its cached beginning (a block table of cached blocks, a parked ring): the
    # graph's sequence starts mid-prompt
    first = random_prompts([26], seed=11)[0]
    results = []
    for graphs in ((), (32,)):
        engine = Engine(model, None, config=_config(prefill_graphs=graphs))
        engine.capture_prefill_graphs(eager=True)
        turn1 = _run(engine, [first], {})["r0"]
        second = first + turn1 + random_prompts([9], seed=12)[0]
        rid = engine.add_request(second, GREEDY)
        tokens, cached = [], 0
        while engine.has_unfinished():
            for event in engine.step():
                tokens.append(event.token_id)
                cached = max(cached, event.cached_tokens or 0)
        assert cached > 0, "the second turn did not reuse the first's blocks"
        results.append((turn1, tokens))
        assert rid not in engine.requests
        assert engine.step_stats.steps["prefill_graph"] == (2 if graphs else 0)  # both turns' prefills
    assert results[0] == results[1]
