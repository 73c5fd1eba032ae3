"""Sliding layers in passes: a ring of window + sliding_chunk slots serves prefill chunks longer than that.

A pass writes its tokens to the ring before it attends, so a ring must hold a query's window plus the pass's
tokens. Chunks longer than `EngineConfig.sliding_chunk` are attended in several passes per sliding layer: the
same numbers as one pass over a ring sized for the whole chunk, with far less memory per sequence.
"""

from __future__ import annotations

import pytest

from nvfp4kit.engine.attention_backend import ENV_VAR, register_attention_backend
from nvfp4kit.engine.batch_context import SeqSlice, sliding_passes, sliding_pieces
from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import random_prompts
from .test_attention_backend import ComparingBackend

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    folder = tiny_checkpoint("moe")  # window 8
    return load_model(folder), Tokenizer(folder)


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[tuple[int, float]]]:
    ids = {engine.add_request(p, PARAMS): i for i, p in enumerate(prompts)}
    out: list[list[tuple[int, float]]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for e in engine.step():
            out[ids[e.request_id]].append((e.token_id, e.logprob))
    return out


def test_pieces_follow_the_limit_and_never_cut_an_image():
    seq = SeqSlice(start=10, length=25, offset=3, block_table=[0], ring=1)
    assert [(p.start, p.length, p.offset) for p in sliding_pieces(seq, 10)] == [
        (10, 10, 3),
        (20, 10, 13),
        (30, 5, 23),
    ]
    with_image = SeqSlice(10, 25, 3, [0], 1, image_spans=((18, 24),))  # a cut at 20 would split the image
    assert [(p.start, p.length) for p in sliding_pieces(with_image, 10)] == [(10, 8), (18, 10), (28, 7)]
    with pytest.raises(ValueError, match="does not fit one sliding pass"):
        sliding_pieces(SeqSlice(0, 30, 0, [0], 1, image_spans=((2, 15),)), 10)
    short = SeqSlice(0, 4, 25, [0], 2)
    assert sliding_passes([seq, short], 40) is None
    passes = sliding_passes([seq, short], 10)
    assert [[(p.start, p.length) for p in one] for one in passes] == [
        [(10, 10), (0, 4)],
        [(20, 10)],
        [(30, 5)],
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_passes_give_the_numbers_of_a_ring_sized_for_the_whole_chunk(parts, backend, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    model, tok = parts
    # three prompts prefilled side by side in chunks of up to 24 tokens (one longer than three windows)
    prompts = random_prompts([29, 11, 3], seed=4)
    common = dict(max_num_batched_tokens=24, block_size=4, attention_backend=backend)
    whole = Engine(model, tok, config=EngineConfig(sliding_chunk=24, **common))
    passes = Engine(model, tok, config=EngineConfig(sliding_chunk=5, **common))
    assert whole.layout.ring_size == 8 + 24 and passes.layout.ring_size == 8 + 5
    expected, got = _run(whole, prompts), _run(passes, prompts)
    assert [[t for t, _ in r] for r in got] == [[t for t, _ in r] for r in expected]
    diff = max(abs(a[1] - b[1]) for x, y in zip(got, expected) for a, b in zip(x, y))
    assert diff < 1e-5, diff


def test_triton_passes_equal_the_reference_passes(parts, monkeypatch):
    model, tok = parts
    compare = ComparingBackend()
    register_attention_backend("compare", lambda: compare)
    monkeypatch.setenv(ENV_VAR, "compare")
    engine = Engine(
        model,
        tok,
        config=EngineConfig(kv_dtype="fp8_e4m3", max_num_batched_tokens=16, block_size=4, sliding_chunk=3),
    )
    _run(engine, random_prompts([21, 2, 9], seed=5))
    assert compare.calls >= 5 * 6  # five steps (two of them with passes), six layers
    assert compare.max_out_error < 1e-4, compare.max_out_error
    assert compare.max_cache_error == 0.0


def test_the_default_caps_the_ring_at_window_plus_512(parts):
    """On the CPU (and GPUs under 70 GiB; `plan.pools.default_sliding_chunk`)."""
    model, tok = parts
    assert Engine(model, tok, config=EngineConfig(max_num_batched_tokens=4096)).layout.ring_size == 8 + 512
    assert Engine(model, tok, config=EngineConfig(max_num_batched_tokens=256)).layout.ring_size == 8 + 256


def test_prefix_cache_hits_with_rings_smaller_than_a_chunk(parts):
    """A second request sharing a long beginning adopts the parked ring and blocks of the first; with rings of
    window + 5 and chunks of 24 it still gives the tokens an engine without the cache gives. (A ring keeps the
    last window + 5 positions: the first request stops within 5 tokens of the shared point, so its ring still
    holds the window the second request continues from.)"""
    model, tok = parts
    shared = random_prompts([37], seed=6)[0]
    jobs = [(shared + [7], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=0)),
            (shared + [11, 12, 13, 14, 15], PARAMS)]  # fmt: skip
    runs = {}
    for caching in (False, True):
        config = EngineConfig(
            max_num_batched_tokens=24, block_size=4, sliding_chunk=5, prefix_caching=caching
        )
        engine = Engine(model, tok, config=config)
        out, hits = [], []
        for prompt, params in jobs:  # one after the other: the second finds the first's blocks
            rid = engine.add_request(prompt, params)
            got = []
            while engine.has_unfinished():
                for e in engine.step():
                    if e.request_id == rid:
                        got.append((e.token_id, e.logprob))
                        hits.append(e.cached_tokens or 0)
            out.append(got)
        runs[caching] = (out, max(hits))
    (plain, no_hits), (cached, most) = runs[False], runs[True]
    assert no_hits == 0 and most >= 32  # the shared blocks were reused
    assert [[t for t, _ in r] for r in cached] == [[t for t, _ in r] for r in plain]
    assert max(abs(a[1] - b[1]) for x, y in zip(cached, plain) for a, b in zip(x, y)) < 1e-5
