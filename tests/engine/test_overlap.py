"""The overlap scheduler on the CPU: decode step N+1 launched from step N's tokens before the host reads them.

Every test runs the same requests through an engine with overlap on and one with it off and asserts the same
events (token ids, text, logprobs, finish reasons), that the overlap really launched steps ahead, and that all
KV blocks and rings are free at the end (the extra token of a request that ended is dropped, never leaked).
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.engine import batch_sampler as sampler_module
from nvfp4kit.engine.batch_sampler import SampleRow, sample_batch, sample_step
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.logits_processors import LogitsRow
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import random_prompts


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    return load_model(folder), Tokenizer(folder)


def _engine(parts, overlap: bool, **config) -> Engine:
    model, tok = parts
    config = {"max_num_batched_tokens": 64, **config}
    return Engine(model, tok, config=EngineConfig(overlap_schedule=overlap, **config))


def _run(engine: Engine, jobs: list, *, actions: dict | None = None, max_steps: int = 400) -> dict:
    """Add `jobs` ((prompt, params) pairs), step until done. `actions[(request_id, n)](engine)` runs once, between
    steps, as soon as that request has had n events (adding or aborting requests: with overlap a step returns
    the events of the step before the one it launched, so actions follow tokens, not step counts).
    Every event per request id, as comparable tuples."""
    ids = [engine.add_request(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(jobs)]
    out: dict[str, list] = {i: [] for i in ids}
    todo = dict(actions or {})
    for _ in range(max_steps):
        for (request_id, n), action in list(todo.items()):
            if len(out.get(request_id, [])) >= n:
                action(engine)
                del todo[(request_id, n)]
        if not engine.has_unfinished():
            break
        for e in engine.step():
            top = [t for t, _ in e.top_logprobs]
            # logprobs as approx: a batch of another size may round the last bits of a float32 matmul apart
            logprob = pytest.approx(e.logprob, abs=1e-3) if e.token_id >= 0 else None
            out.setdefault(e.request_id, []).append(
                (e.token_id, e.text, logprob, top, e.finish_reason, e.cached_tokens)
            )
    assert not engine.has_unfinished() and not todo
    return out


def _all_free(engine: Engine) -> bool:
    return (
        len(engine.cache.free_blocks) == engine.layout.num_blocks
        and len(engine.cache.free_rings) == engine.layout.max_seqs
    )


def _same_with_and_without_overlap(parts, jobs, *, actions=None, **config) -> tuple[dict, Engine]:
    sync = _engine(parts, False, **config)
    expected = _run(sync, jobs, actions=actions)
    engine = _engine(parts, True, **config)
    assert _run(engine, jobs, actions=actions) == expected
    assert sync.overlapped_steps == 0 and engine.overlapped_steps > 0
    assert _all_free(engine) and _all_free(sync)
    # `/metrics` counts every decode launched, also a launch ahead that a finished request left unread
    assert engine.step_stats.steps["decode_eager"] >= sync.step_stats.steps["decode_eager"] > 0
    return expected, engine


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_mixed_batch_stopping_at_different_steps(parts):
    model, tok = parts
    prompts = random_prompts([7, 12, 5, 9, 16, 6], seed=11)
    # find stop ids and a stop string that the greedy run meets mid-way
    probe = _run(_engine(parts, False), [(prompts[0], _greedy(10)), (prompts[1], _greedy(10))])
    stop_id = probe["r0"][3][0]
    texts = [event[1] for event in probe["r1"]]
    # the first piece of text, from the third token on, that the text before it does not contain
    at = next(
        i for i in range(2, 10) if texts[i] and texts[i] not in "".join(texts[: i + 1])[: -len(texts[i])]
    )
    stop_text = texts[at]
    jobs = [
        (prompts[0], _greedy(10, stop_token_ids=(stop_id,))),
        (prompts[1], _greedy(10, stop=(stop_text,))),
        (prompts[2], _greedy(3)),
        (prompts[3], SamplingParams(max_tokens=9, temperature=0.9, top_k=20, seed=5, ignore_eos=True)),
        (prompts[4], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=6, logprobs=2)),
        (prompts[5], _greedy(8, logprobs=1, min_tokens=4, stop_token_ids=(stop_id,))),
    ]
    out, _ = _same_with_and_without_overlap(parts, jobs)
    reasons = [events[-1][4] for events in out.values()]
    assert reasons[:3] == ["stop", "stop", "length"]
    assert [len(events) for events in out.values()][:3] == [4, at + 1, 3]


def test_requests_added_and_aborted_mid_decode(parts):
    prompts = random_prompts([9, 14, 6, 11], seed=12)
    jobs = [(prompts[0], _greedy(14)), (prompts[1], _greedy(14))]

    def add(engine):
        engine.add_request(prompts[2], _greedy(6), request_id="late")

    def add_seeded(engine):
        params = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
        engine.add_request(prompts[3], params, request_id="later")

    actions = {
        ("r0", 3): add,
        ("r1", 5): lambda engine: engine.abort("r1"),
        ("r0", 6): add_seeded,
        ("late", 3): lambda engine: engine.abort("late"),
    }
    out, _ = _same_with_and_without_overlap(parts, jobs, actions=actions)
    assert len(out["r0"]) == 14 and len(out["later"]) == 8
    assert len(out["r1"]) == 5 and len(out["late"]) == 3  # aborted: no finish event from the engine
    assert out["r1"][-1][4] is None and out["late"][-1][4] is None


def test_preemption_under_a_small_pool(parts):
    prompts = random_prompts([14, 12, 10, 9], seed=3)
    jobs = [(p, _greedy(12)) for p in prompts]
    _, engine = _same_with_and_without_overlap(
        parts, jobs, num_kv_tokens=64, block_size=4, prefix_caching=False
    )
    assert engine.stats()["preemptions"] > 0


def test_n_choices_and_prefix_cache_hits(parts):
    prompt = random_prompts([37], seed=4)[0]
    seeded = [
        SamplingParams(max_tokens=6 + i, temperature=1.0, top_k=30, seed=i, ignore_eos=True) for i in range(3)
    ]
    jobs = [(prompt, params) for params in seeded] + [(prompt, _greedy(5))]

    def follow_up(engine):  # the same beginning again, once the first choice is done
        engine.add_request(prompt + [7, 8, 9], _greedy(4), request_id="again")

    out, engine = _same_with_and_without_overlap(parts, jobs, actions={("r0", 6): follow_up}, block_size=4)
    assert out["again"][0][5] > 0 and out["r1"][0][5] > 0  # prompt tokens served from the cache
    assert engine.scheduler.prefix.hit_tokens > 0


def test_penalties_and_grammars_run_synchronously(parts):
    prompts = random_prompts([8, 10], seed=5)
    jobs = [(prompts[0], _greedy(6, repetition_penalty=1.3)), (prompts[1], _greedy(6, presence_penalty=0.5))]
    sync = _run(_engine(parts, False), jobs)
    engine = _engine(parts, True)
    assert _run(engine, jobs) == sync and engine.overlapped_steps == 0 and _all_free(engine)


def test_a_failing_row_ends_its_request_alone_under_overlap(parts, monkeypatch):
    real_sample = sampler_module.sample_table
    calls = {"n": 0}

    def sample_or_break(logits, rows):  # the seeded row fails on its fourth draw
        if any(row.params.seed == 13 for row in rows):
            calls["n"] += 1
            if calls["n"] >= 4:
                raise RuntimeError("broken row")
        return real_sample(logits, rows)

    monkeypatch.setattr(sampler_module, "sample_table", sample_or_break)
    prompts = random_prompts([8, 10, 6], seed=6)
    healthy = [(prompts[0], _greedy(8)), (prompts[1], SamplingParams(max_tokens=8, temperature=0.7, seed=2))]
    poison = (prompts[2], SamplingParams(max_tokens=8, temperature=0.7, seed=13, ignore_eos=True))
    engine = _engine(parts, True)
    out = _run(engine, healthy + [poison])
    calls["n"] = -1000  # no failure in the reference run
    alone = _run(_engine(parts, False), healthy)
    assert out["r0"] == alone["r0"] and out["r1"] == alone["r1"]
    assert out["r2"][-1][0] == -1 and out["r2"][-1][4] == "error" and len(out["r2"]) <= 4
    assert engine.overlapped_steps > 0 and _all_free(engine)


def test_sample_step_lays_out_mixed_rows_like_sample_batch_row_by_row():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3

    def rows():
        params = [
            SamplingParams(temperature=0),
            SamplingParams(temperature=0.9, seed=1, logprobs=3),
            SamplingParams(temperature=0, logprobs=1),
            SamplingParams(temperature=1.0, top_k=5, seed=2),
        ]
        return [
            SampleRow(p, [], [], torch.Generator().manual_seed(p.seed) if p.seed else None) for p in params
        ]

    batch = rows()
    step = sample_step(logits, [LogitsRow(r.params, 0, frozenset()) for r in batch], batch)
    alone = [sample_batch(logits[i : i + 1], [row])[0] for i, row in enumerate(rows())]
    results = step.results()
    assert [r.token_id for r in results] == [r.token_id for r in alone] == step.tokens.tolist()
    for got, want in zip(results, alone):
        assert got.logprob == pytest.approx(want.logprob)
        assert [t for t, _ in got.top_logprobs] == [t for t, _ in want.top_logprobs]
        assert [v for _, v in got.top_logprobs] == pytest.approx([v for _, v in want.top_logprobs])


def test_decode_graph_buffers_take_the_tokens_from_the_device(tiny_checkpoint):
    """The graph path (fixed buffers, padding; run eagerly as CUDA graphs cannot be captured on the CPU) fed
    with the previous step's device tokens gives the tokens of the synchronous graph path."""
    from nvfp4kit.engine.cuda_graphs import DecodeGraphs

    folder = tiny_checkpoint("moe")
    parts = load_model(folder), Tokenizer(folder)
    prompts = random_prompts([13, 6], seed=4)
    jobs = [(prompts[0], _greedy(4)), (prompts[1], _greedy(2, logprobs=1))]
    config = {
        "block_size": 4,
        "max_num_batched_tokens": 32,
        "max_model_len": 64,
        "attention_backend": "triton",
    }
    results, fed = [], []
    for overlap in (False, True):
        engine = _engine(parts, overlap, **config)
        engine.graphs = DecodeGraphs(
            parts[0],
            engine.cache,
            batch_sizes=(1, 4),
            max_model_len=64,
            attention_backend="triton",
            eager=True,
        )
        engine.graphs.capture()

        def run(ids, seqs, replay=engine.graphs.run):
            fed.append(isinstance(ids, torch.Tensor))
            return replay(ids, seqs)

        engine.graphs.run = run
        results.append(_run(engine, jobs))
        assert _all_free(engine)
    assert results[0] == results[1]
    assert engine.overlapped_steps > 0 and any(fed)


def test_bench_decode_with_overlap_on_and_off_and_the_flags(parts):
    import argparse

    from nvfp4kit.bench import register_all
    from nvfp4kit.bench.engine_runs import decode_speed
    from nvfp4kit.cli.engine_options import add_engine_arguments, llm_arguments

    engine = _engine(parts, False, max_num_seqs=4)
    for overlap in (True, False):
        result = decode_speed(engine, batch=3, context=20, steps=4, overlap=overlap)
        assert result.tokens_per_s > 0 and result.gpu_ms_per_step is None  # no CUDA events on the CPU
        assert result.overlapped_steps == (4 if overlap else 0)  # every timed step launched ahead
        assert not engine.has_unfinished() and _all_free(engine)
    assert engine.overlapped_steps > 0
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert llm_arguments(parser.parse_args([]))["engine_config"].overlap_schedule is None  # on with CUDA
    flagged = llm_arguments(parser.parse_args(["--no-overlap-schedule"]))["engine_config"]
    assert flagged.overlap_schedule is False
    bench = argparse.ArgumentParser()
    register_all(bench.add_subparsers(dest="scenario"))
    assert bench.parse_args(["engine", "--overlap", "both"]).overlap == "both"
    assert bench.parse_args(["engine"]).overlap == "on"


def test_overlap_is_on_by_default_only_on_cuda(parts):
    assert Engine(parts[0], parts[1]).overlap is False  # the CPU gains nothing from it
    assert Engine(parts[0], parts[1], config=EngineConfig(overlap_schedule=True)).overlap is True


def test_aborting_every_request_in_flight_frees_all_and_the_engine_goes_on(parts):
    prompts = random_prompts([9, 12, 7], seed=8)
    engine = _engine(parts, True)
    for i in range(2):
        engine.add_request(prompts[i], _greedy(10), request_id=f"r{i}")
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None  # a decode step launched ahead, not read yet
    engine.abort("r0")
    engine.abort("r1")
    assert not engine.has_unfinished() and _all_free(engine)
    alone = _run(_engine(parts, False), [(prompts[2], _greedy(6))])
    assert _run(engine, [(prompts[2], _greedy(6))]) == alone and _all_free(engine)


def test_async_engine_streams_the_same_tokens_with_overlap_and_frees_closed_streams(parts):
    import asyncio

    from nvfp4kit.engine.async_batching import AsyncBatchingEngine

    prompts = random_prompts([8, 11, 6, 9], seed=9)
    params = [
        _greedy(9),
        SamplingParams(max_tokens=7, temperature=0.8, seed=4, ignore_eos=True),
        _greedy(5, logprobs=2),
    ]

    async def run(overlap: bool):
        engine = AsyncBatchingEngine(_engine(parts, overlap))

        async def collect(prompt, sampling):
            return [(e.token_id, e.text, e.finish_reason) async for e in engine.stream(prompt, sampling)]

        async def leave_early():  # a client that goes away after three tokens: its request is aborted
            tokens = []
            stream = engine.stream(prompts[3], _greedy(20))
            async for event in stream:
                tokens.append(event.token_id)
                if len(tokens) == 3:
                    break
            await stream.aclose()
            return tokens

        jobs = [collect(p, sp) for p, sp in zip(prompts, params)] + [leave_early()]
        out = await asyncio.gather(*jobs)
        for _ in range(200):  # the worker applies the abort between steps
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        inner = engine.engine
        await engine.close()
        return out, inner

    expected, sync = asyncio.run(run(False))
    out, engine = asyncio.run(run(True))
    assert out == expected and [len(tokens) for tokens in out] == [9, 7, 5, 3]
    assert engine.overlapped_steps > 0 and _all_free(engine) and _all_free(sync)
