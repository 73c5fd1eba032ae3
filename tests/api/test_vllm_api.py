"""The vLLM-shaped Python API: `LLM()` on the demo, `generate(prompts, sampling_params=..., use_tqdm=...)`,
dict prompts, n samples in `outputs`, `max_tokens=None`, `LLM.chat`, `get_tokenizer`, engine keywords."""

import pytest

from nvfp4kit.llm import LLM
from nvfp4kit.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("moe"), max_model_len=64, enforce_eager=True, max_num_seqs=4, seed=7)


def test_generate_has_vllm_results(llm):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=3, ignore_eos=True, logprobs=2)
    [out] = llm.generate(["Hello"], sampling_params=params, use_tqdm=False)
    assert out.prompt == "Hello" and out.prompt_token_ids[0] == 2
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # seeds 3, 4, 5
    assert out.text == out.outputs[0].text and out.token_ids == out.outputs[0].token_ids
    first = out.outputs[0].logprobs[0]
    assert out.outputs[0].token_ids[0] in first and 2 <= len(first) <= 3
    again = llm.generate("Hello", SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True))
    assert again[0].token_ids == out.outputs[0].token_ids


def test_dict_prompts_and_max_tokens_none(llm):
    ids = llm.get_tokenizer().encode("Hi there")
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    by_ids, by_text = llm.generate(
        [{"prompt_token_ids": ids}, {"prompt": "Hi there"}], greedy, use_tqdm=False
    )
    assert by_ids.token_ids == by_text.token_ids and by_ids.prompt is None and by_text.prompt == "Hi there"
    [full] = llm.generate(
        "Hi", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert len(full.prompt_token_ids) + len(full.token_ids) == 64


def test_a_failed_generate_leaves_no_request_behind(llm):
    """A bad prompt after a good one (images for a text-only model) raises; the good one does not linger in the
    engine to break the next call."""
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    [alone] = llm.generate("Hi there", greedy, use_tqdm=False)
    image_prompt = {"prompt": "What is <|image|>?", "multi_modal_data": {"image": b"not read"}}
    with pytest.raises(ValueError, match="text only"):
        llm.generate(["Hi there", image_prompt], greedy, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    [again] = llm.generate("Hi there", greedy, use_tqdm=False)
    assert again.token_ids == alone.token_ids


def test_prompt_logprobs_through_the_api(llm):
    [out] = llm.generate("Count to three", SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)


def test_chat_renders_the_template_and_continues_a_message(llm):
    messages = [{"role": "user", "content": "Hi <|turn>"}]
    [out] = llm.chat(messages, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert out.prompt.startswith("<bos><|turn>user\nHi <|turn>") and out.prompt.endswith(
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    turn_open = llm.get_tokenizer().special_tokens["<|turn>"]
    assert out.prompt_token_ids.count(turn_open) == 2  # the user's "<|turn>" stayed text
    partial = [*messages, {"role": "assistant", "content": "Well"}]
    [cont] = llm.chat(partial, SamplingParams(max_tokens=2), continue_final_message=True, use_tqdm=False)
    assert cont.prompt.endswith("Well")
    two = llm.chat([messages, partial], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(two) == 2


def test_llm_seed_makes_unseeded_runs_reproducible(tiny_checkpoint, llm):
    other = LLM(tiny_checkpoint("moe"), max_model_len=64, seed=7)
    params = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    fresh = LLM(tiny_checkpoint("moe"), max_model_len=64, seed=7)
    assert other.generate("Hey", params)[0].token_ids == fresh.generate("Hey", params)[0].token_ids
    assert other.engine.config.cuda_graphs and not llm.engine.config.cuda_graphs
    assert llm.engine.config.max_num_seqs == 4


def test_llm_without_a_model_loads_the_demo():
    from nvfp4kit.demo import demo_model_path

    demo = LLM(max_model_len=32)
    assert demo.path == demo_model_path("nvfp4")
    assert demo.generate("Hi", SamplingParams(max_tokens=2, temperature=0))[0].finish_reason is not None
