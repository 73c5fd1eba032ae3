"""The LLM API, sampling and the generate/inspect/make-tiny commands on a tiny checkpoint."""

import json

import pytest
import torch

from nvfp4kit import LLM, SamplingParams
from nvfp4kit.cli import main
from nvfp4kit.sampling import filter_logits


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("moe"))


def test_generate_returns_text_ids_and_finish_reason(llm):
    outs = llm.generate(
        ["Hello", [2, 10, 11, 12]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    )
    assert len(outs) == 2
    for out in outs:
        assert len(out.token_ids) == 5 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)
    assert outs[0].prompt_token_ids[0] == 2  # <bos>


def test_same_seed_same_tokens_and_different_seed_differs(llm):
    def run(seed):
        return llm.generate("Hi", SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True))[
            0
        ]

    assert run(7).token_ids == run(7).token_ids
    assert any(run(s).token_ids != run(7).token_ids for s in (8, 9, 10))


def test_stop_token_ids_end_generation(llm):
    greedy = llm.generate("Hi", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop_at = greedy.token_ids[3]
    out = llm.generate("Hi", SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"


def test_stop_string_is_cut_from_the_text(llm):
    greedy = llm.generate("Hi", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop = greedy.text[3:5]
    out = llm.generate("Hi", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == greedy.text[: greedy.text.index(stop)]


def test_logprobs_are_normalised_and_include_the_chosen_token(llm):
    out = llm.generate("Hi", SamplingParams(max_tokens=3, temperature=0, logprobs=5, ignore_eos=True))[0]
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 5 and top[0][0] == token  # greedy picks the most likely
        assert lp == pytest.approx(top[0][1]) and lp <= 0


def test_prompt_too_long_is_refused(tiny_checkpoint):
    small = LLM(tiny_checkpoint("moe"), max_model_len=16)
    with pytest.raises(ValueError, match=r"exceeds the context this engine can hold \(16 tokens\)"):
        small.generate([2] * 10, SamplingParams(max_tokens=8))


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda **kw: torch.isfinite(
        filter_logits(logits.clone(), SamplingParams(temperature=1.0, **kw))
    ).tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(min_p=0.5) == [True, True, False, False]


def test_invalid_sampling_params_are_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_cli_make_tiny_inspect_and_generate(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert main(["make-tiny", str(folder), "--shape", "dense"]) == 0
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["model_type"] == "gemma4_text" and info["layers"] == 6
    assert info["components"]["attention"]["dtypes"] == ["BF16"]
    file_size = info["files"]["model.safetensors"]
    assert 0.95 * file_size < info["total_bytes"] < file_size  # tensor bytes, without the header
    assert main(["generate", str(folder), "--prompt", "Hi", "--max-tokens", "4", "--temperature", "0"]) == 0
    assert "4 tokens" in capsys.readouterr().err


def test_cli_reports_a_bad_checkpoint_as_an_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_cli_generate_defaults_to_the_demo_and_parses_a_thinking_chat(capsys):
    args = [
        "generate",
        "--prompt",
        "What is 12 + 7?",
        "--chat",
        "--think",
        "--temperature",
        "0",
        "--max-tokens",
        "80",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("[thinking] ") and "<|channel>" not in out and "<channel|>" not in out
