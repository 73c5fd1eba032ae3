"""`nvfp4kit serve --random-weights SHAPE`: an LLM with random NVFP4 weights of a preset's shape."""

from __future__ import annotations

import pytest

from nvfp4kit.cli import serve as serve_cli
from nvfp4kit.sampling import SamplingParams
from nvfp4kit.testing.random_llm import RandomLLM, random_shape_config, random_shapes


def test_shape_names():
    assert random_shape_config("26b-a4b")[0] == random_shape_config("gemma-4-26b-a4b")[0] == "gemma-4-26b-a4b"
    name, text, generation = random_shape_config("gemma-4-26b-a4b")
    assert text["hidden_size"] == 2816 and text["num_experts"] == 128 and text["vocab_size"] == 262144
    assert generation["eos_token_id"] == [1, 106, 50]
    assert {"gemma-4-26b-a4b", "tiny-moe"} <= set(random_shapes())
    with pytest.raises(ValueError, match="known: .*gemma-4-26b-a4b"):
        random_shape_config("gemma-5")


def test_random_llm_generates_and_cleans_up():
    llm = RandomLLM("tiny-moe", seed=0)
    folder = llm.path
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert llm.tokenizer.vocab_size == llm.config.vocab_size  # every sampled id decodes
    assert llm.model.layers[0].self_attn.qkv_proj.quantized
    out = llm.generate(
        ["hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].token_ids) == 5
    again = llm.generate(
        ["hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert again[0].token_ids == out[0].token_ids
    llm.close()
    assert not folder.exists()


def test_serve_refuses_a_folder_and_random_weights_together():
    from nvfp4kit.cli import build_parser

    args = build_parser(["serve"]).parse_args(["serve", "/some/folder", "--random-weights", "26b-a4b"])
    with pytest.raises(ValueError, match="not both"):
        serve_cli.run(args)


def test_serve_flags_for_random_weights_and_prefix_caching():
    from nvfp4kit.cli import build_parser

    parser = build_parser(["serve"])
    args = parser.parse_args(["serve", "--random-weights", "26b-a4b", "--no-prefix-caching"])
    assert args.random_weights == "26b-a4b" and args.prefix_caching is False
    assert parser.parse_args(["serve"]).prefix_caching is True


def test_random_llm_takes_every_engine_flag(tmp_path):
    """`serve --random-weights` hands RandomLLM the keywords every engine flag makes (as `LLM` gets them)."""
    import inspect

    from nvfp4kit.cli import build_parser
    from nvfp4kit.cli.engine_options import llm_arguments
    from nvfp4kit.kernels import configs

    argv = ["serve", "--random-weights", "tiny-moe", "--kernel-cache-dir", str(tmp_path), "--tune"]
    keywords = llm_arguments(build_parser(["serve"]).parse_args(argv))
    inspect.signature(RandomLLM).bind("tiny-moe", **keywords)  # raises on a keyword it lacks
    try:
        RandomLLM("tiny-moe", kernel_cache_dir=tmp_path).close()
        assert configs.cache_dir() == tmp_path
    finally:
        configs.set_cache_dir(None)
