"""The batching engine against the one-sequence reference: same greedy tokens under every schedule."""

import pytest
import torch

from nvfp4kit.engine.engine import Engine, EngineConfig
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.loader import load_model
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.tokenizer import Tokenizer

from .helpers import generate_tokens, random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["moe", "e2b", "moe-nvfp4"])
def setup(request, tiny_checkpoint, tmp_path_factory):
    folder = tiny_checkpoint(request.param.removesuffix("-nvfp4"))
    if request.param.endswith("-nvfp4"):  # the same model quantized (all linears NVFP4, packed in memory)
        from nvfp4kit.quant import quantize

        out = tmp_path_factory.mktemp("nvfp4") / "ckpt"
        quantize(folder, out, num_samples=4, seq_len=32, progress=False)
        folder = out
    return load_model(folder), Tokenizer(folder)


def reference_greedy(model, ids, n):
    cache, out, step_ids = ContiguousKVCache(model.config), [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            ctx = cache.step(len(step_ids))
            token = int(model(torch.tensor(step_ids), ctx)[-1].argmax())
            ctx.commit()
            out.append(token)
            step_ids = [token]
    return out


def test_mixed_lengths_batched_equal_each_alone(setup):
    model, tok = setup
    reqs = random_prompts([3, 17, 40, 9])  # window is 8: two are several windows long
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=64))
    assert generate_tokens(engine, reqs, GREEDY) == [reference_greedy(model, p, 12) for p in reqs]


def test_small_prefill_chunks_give_the_same_tokens(setup):
    model, tok = setup
    reqs = random_prompts([30, 23], seed=1)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=5))
    assert generate_tokens(engine, reqs, GREEDY) == [reference_greedy(model, p, 12) for p in reqs]


def test_requests_added_while_others_decode(setup):
    model, tok = setup
    a, b = random_prompts([20, 11], seed=2)
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=16))
    outs = {engine.add_request(a, GREEDY): []}
    for step in range(40):
        if step == 4:
            outs[engine.add_request(b, GREEDY)] = []
        for event in engine.step():
            outs[event.request_id].append(event.token_id)
    assert list(outs.values()) == [reference_greedy(model, a, 12), reference_greedy(model, b, 12)]


def test_preemption_and_resumption_keep_outputs(setup):
    model, tok = setup
    reqs = random_prompts([14, 12, 10, 9], seed=3)
    # 4 requests x 26 tokens need 104 slots; the pool holds 64, so some are preempted and recomputed
    engine = Engine(
        model, tok, config=EngineConfig(max_num_batched_tokens=64, num_kv_tokens=64, block_size=4)
    )
    assert generate_tokens(engine, reqs, GREEDY) == [reference_greedy(model, p, 12) for p in reqs]
    assert engine.stats()["preemptions"] > 0
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks


def test_abort_frees_all_kv_at_any_point(setup):
    model, tok = setup
    engine = Engine(model, tok, config=EngineConfig(max_num_batched_tokens=6, block_size=4))
    a = engine.add_request(random_prompts([30])[0], GREEDY)
    engine.step()  # mid-prefill
    engine.abort(a)
    assert len(engine.cache.free_blocks) == engine.layout.num_blocks and not engine.has_unfinished()
    b = engine.add_request(random_prompts([5])[0], GREEDY)
    for _ in range(3):
        engine.step()  # decoding
    engine.abort(b)
    assert len(engine.cache.free_rings) == engine.layout.max_seqs and not engine.has_unfinished()


def test_recycled_blocks_do_not_leak_between_requests(setup):
    model, tok = setup
    first, second = random_prompts([25, 25], seed=5), random_prompts([18, 7, 25], seed=6)
    engine = Engine(
        model, tok, config=EngineConfig(max_num_batched_tokens=32, num_kv_tokens=96, block_size=4)
    )
    generate_tokens(engine, first, GREEDY)  # leaves stale KV in the blocks the next requests get
    assert generate_tokens(engine, second, GREEDY) == [reference_greedy(model, p, 12) for p in second]


def test_k_eq_v_once_matches_separate_storage(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    model, tok = load_model(folder), Tokenizer(folder)
    reqs = random_prompts([21, 6], seed=7)
    once = Engine(model, tok, config=EngineConfig(k_eq_v_once=True))
    both = Engine(model, tok, config=EngineConfig(k_eq_v_once=False))
    assert once.cache.keys[5] is None and both.cache.keys[5] is not None  # layer 5 is the k_eq_v global layer
    assert generate_tokens(once, reqs, GREEDY) == generate_tokens(both, reqs, GREEDY)
    assert once.cache.nbytes() < both.cache.nbytes()


def test_low_precision_kv_stays_close_and_fp8_costs_more_than_bf16(tiny_checkpoint):
    folder = tiny_checkpoint("moe")
    model, tok = load_model(folder), Tokenizer(folder)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=384, ignore_eos=True)

    def logprobs(kv_dtype, prompt):
        engine = Engine(model, tok, config=EngineConfig(kv_dtype=kv_dtype))
        engine.add_request(prompt, params)
        return torch.tensor([lp for _, lp in sorted(engine.step()[0].top_logprobs)])

    def mean_kl(kv_dtype):
        kls = []
        for prompt in random_prompts([20, 20, 20, 20], seed=8):
            exact = logprobs("float32", prompt)
            kls.append(float((exact.exp() * (exact - logprobs(kv_dtype, prompt))).sum()))
        return sum(kls) / len(kls)

    kl = {kv: mean_kl(kv) for kv in ("bf16", "fp8_e4m3", "fp8_e5m2")}
    # a random model's next-token distribution is nearly flat, so logit noise shows up strongly as KL
    assert kl["bf16"] < 0.02 and kl["fp8_e4m3"] < 1.0 and kl["fp8_e5m2"] < 1.0, kl
    assert 5 * kl["bf16"] < min(kl["fp8_e4m3"], kl["fp8_e5m2"]), kl


def test_penalties_steer_greedy_decoding_away_from_repeats(setup):
    model, tok = setup
    prompt = random_prompts([10], seed=9)[0]
    engine = Engine(model, tok)

    def tokens(**penalty):
        return generate_tokens(
            engine, [prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **penalty)
        )[0]

    assert len(set(tokens(presence_penalty=100.0))) == 24  # any token seen once is out of reach
    assert len(set(tokens(frequency_penalty=100.0))) == 24
    repeated = tokens(repetition_penalty=1e6)  # prompt tokens count too
    assert len(set(repeated)) == 24 and not set(repeated) & set(prompt)


def test_too_long_request_is_refused_before_it_runs(setup):
    model, tok = setup
    engine = Engine(model, tok, config=EngineConfig(num_kv_tokens=32, block_size=4))
    with pytest.raises(ValueError, match=r"exceeds the context this engine can hold \(32 tokens\)"):
        engine.add_request(list(range(5, 30)), SamplingParams(max_tokens=10))
