"""On the card: after the start-up warm-up, serving steps of random prompt lengths and batch mixes compile no
Triton kernel (`cuda` marker: skipped without a GPU). On the card:
`PYTHONPATH=src python3 -m pytest -m cuda -q tests/gpu/test_warmup_cuda.py`.

A tiny random NVFP4 MoE model (every linear, the MoE and the attention through the Triton kernels) with FP8 KV,
as the server runs the 26B-A4B shape: random prompts of 1 to 1,500 tokens (prefill chunks of every length,
contexts long enough for many key splits), random output lengths, shared beginnings (prefix-cache hits: chunks
that start mid-prompt), arriving between steps so steps mix decode rows, chunk tails and admissions. A failure
names the kernels that compiled (engine/kernel_compiles.py) and so what the warm-up plan misses.
"""

from __future__ import annotations

import random

import pytest
import torch

from nvfp4kit.config import config_from_dict
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.engine.kernel_compiles import COMPILES
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny_config import tiny_text_config

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict(tiny_text_config("moe"))
    return random_model(cfg, quantized=True, dtype=torch.bfloat16, device="cuda", seed=0)


def _serve_random_traffic(engine: Engine, seed: int, requests: int = 120) -> int:
    """Random requests arriving between steps until all finish; the number of steps."""
    rng = random.Random(seed)
    shared = [rng.randrange(5, 380) for _ in range(700)]  # a common beginning for a third of the prompts
    pending = []
    for _ in range(requests):
        length = rng.choice([rng.randint(1, 40), rng.randint(40, 400), rng.randint(400, 1500)])
        own = [rng.randrange(5, 380) for _ in range(length)]
        prompt = shared[: rng.randint(1, 700)] + own if rng.random() < 0.33 else own
        params = SamplingParams(max_tokens=rng.randint(1, 48), temperature=0, ignore_eos=True)
        pending.append((prompt[:1900], params))
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3, 6])):
            if pending:
                engine.add_request(*pending.pop())
        engine.step()
        steps += 1
    return steps


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_no_kernel_compiles_after_the_warm_up(model, cuda_graphs):
    config = EngineConfig(
        kv_dtype="fp8_e4m3", max_num_seqs=12, max_num_batched_tokens=96, max_model_len=2048,
        num_kv_tokens=24 * 1024, cuda_graphs=cuda_graphs, warmup=True,
    )  # fmt: skip
    engine = Engine(model, None, config=config)  # warmup=True: also the eager (no graphs) case
    report = engine.warmup
    assert report is not None and report.steps > 10  # 19-27 for these limits (engine/warmup_plan.py)
    if report.compiles is None:
        pytest.skip("this Triton has no jit_post_compile_hook: compilations cannot be counted")
    assert COMPILES.installed and COMPILES.ready
    _, before = COMPILES.counts()
    first = len(COMPILES.serving_kernels)
    steps = _serve_random_traffic(engine, seed=1) + _serve_random_traffic(engine, seed=2)
    _, after = COMPILES.counts()
    assert steps > 200
    missed = COMPILES.serving_kernels[first:]
    assert after - before == 0, (
        f"{after - before} kernel variants compiled while serving, after a warm-up of {report.steps} steps "
        f"({report.compiles} compiles, {report.seconds:.1f} s): {missed}"
    )


def test_warm_up_leaves_no_trace_on_the_card(model):
    """Same greedy tokens with and without the warm-up (its scratch KV rows are written back)."""
    prompts = [[int(t) for t in torch.randint(5, 380, (n,))] for n in (3, 70, 300)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {}
    for warm in (False, True):
        config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1024, warmup=warm)
        engine = Engine(model, None, config=config)
        ids = [engine.add_request(p, params) for p in prompts]
        out = {i: [] for i in ids}
        while engine.has_unfinished():
            for event in engine.step():
                out[event.request_id].append(event.token_id)
        tokens[warm] = [out[i] for i in ids]
        engine.close()
    assert tokens[True] == tokens[False]
