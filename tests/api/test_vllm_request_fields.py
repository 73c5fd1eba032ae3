"""vLLM's SamplingParams fields through `LLM.generate`: allowed_token_ids, bad_words (strings, tokenized when
the request is made) and cache_salt (the engine's prefix-cache hits)."""

import random

import pytest

from nvfp4kit.llm import LLM
from nvfp4kit.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("moe"), max_model_len=256, enforce_eager=True, max_num_seqs=4)


def ids_of(llm, params: SamplingParams, prompt="Once") -> list[int]:
    return llm.generate(prompt, params, use_tqdm=False)[0].token_ids


def test_allowed_token_ids_and_bad_words(llm):
    tok = llm.get_tokenizer()
    a, b = tok.encode("a", add_bos=False)[0], tok.encode("b", add_bos=False)[0]
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    assert set(ids_of(llm, SamplingParams(**greedy, allowed_token_ids=[a, b]))) <= {a, b}
    # a sampled batch of rows with and without bans: each row keeps its own mask
    rows = llm.generate(
        ["Once", "Once"],
        [
            SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=[a]),
            SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    assert rows[0].token_ids == [a] * 8 and rows[1].token_ids != [a] * 8
    biased = {**greedy, "logit_bias": {a: 60.0, b: 50.0}}
    assert ids_of(llm, SamplingParams(**biased)) == [a] * 6
    assert ids_of(llm, SamplingParams(**biased, bad_words=["aa"])) == [a, b] * 3
    assert ids_of(llm, SamplingParams(**biased, bad_words=["a"])) == [b] * 6
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_cache_salt_keys_the_prefix_cache(llm):
    prefix = llm.engine.scheduler.prefix
    prompt = {"prompt_token_ids": [2] + random.Random(11).choices(range(10, 300), k=100)}

    def hits(**fields) -> int:
        before = prefix.hit_tokens
        llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, **fields), use_tqdm=False)
        return prefix.hit_tokens - before

    assert hits(cache_salt="s1") == 0
    assert hits(cache_salt="s1") > 0
    assert hits(cache_salt="s2") == 0
    assert hits() == 0
    assert hits() > 0
