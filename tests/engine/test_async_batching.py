"""The async engine: concurrent streams are batched and give what each request gives alone."""

import asyncio

import pytest
import torch

from nvfp4kit.engine.async_batching import AsyncBatchingEngine
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    return load_model(folder), Tokenizer(folder)


def collect(engine, prompt, params):
    async def go():
        return [e.token_id async for e in engine.stream(prompt, params)]

    return go()


def test_concurrent_streams_equal_running_alone(parts):
    model, tok = parts
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 384, (int(n),), generator=gen).tolist() for n in (5, 19, 12, 3, 27, 8)]

    async def main():
        engine = AsyncBatchingEngine(Engine(model, tok, config=EngineConfig(max_num_batched_tokens=32)))
        alone = [await collect(engine, p, params) for p in prompts]
        together = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        await engine.close()
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone and all(len(t) == 10 for t in alone)


def test_closing_a_stream_early_aborts_and_frees_kv(parts):
    model, tok = parts
    inner = Engine(model, tok, config=EngineConfig(block_size=4))

    async def main():
        engine = AsyncBatchingEngine(inner)
        stream = engine.stream(
            list(range(5, 25)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        )
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if not inner.has_unfinished():
                break
            await asyncio.sleep(0.01)
        await engine.close()

    asyncio.run(main())
    assert not inner.has_unfinished() and len(inner.cache.free_blocks) == inner.layout.num_blocks


def test_a_request_that_cannot_fit_fails_alone(parts):
    model, tok = parts

    async def main():
        engine = AsyncBatchingEngine(Engine(model, tok, config=EngineConfig(num_kv_tokens=32, block_size=4)))
        with pytest.raises(ValueError, match="exceeds the context"):
            await collect(engine, list(range(5, 40)), SamplingParams(max_tokens=4))
        ok = await collect(engine, [2, 7, 9], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        await engine.close()
        return ok

    assert len(asyncio.run(main())) == 3


def test_metrics_count_the_engine_steps_by_kind(parts):
    from nvfp4kit.serve.metrics import ServerMetrics

    model, tok = parts
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def main():
        engine = AsyncBatchingEngine(Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16)))
        await asyncio.gather(*(collect(engine, list(range(5, 5 + n)), params) for n in (20, 7)))
        stats = engine.stats()
        await engine.close()
        return stats

    stats = asyncio.run(main())
    steps = {kind: (n, seconds) for kind, n, seconds, _ in stats.steps}
    # 27 prompt tokens in chunks of at most 16 take at least 2 prefill steps; 6 tokens each, the first sampled
    # at the end of the prompt: 5 decode steps at least (on the CPU no graphs: eager)
    assert steps["prefill"][0] >= 2 and steps["decode_eager"][0] >= 5 and steps["decode_graph"][0] == 0
    assert all(seconds > 0 for n, seconds in steps.values() if n)
    text = ServerMetrics(lambda: stats).render()
    assert f'\nnvfp4kit_engine_steps_total{{kind="prefill"}} {steps["prefill"][0]}\n' in text
    assert '\nnvfp4kit_engine_step_seconds_total{kind="decode_eager"} ' in text
    # no CUDA events on the CPU: the decode steps' GPU seconds stay 0 (the GPU test checks them on a card)
    assert '\nnvfp4kit_engine_step_device_seconds_total{kind="decode_eager"} 0.0\n' in text
    assert "\nnvfp4kit_preemptions_total 0\n" in text
