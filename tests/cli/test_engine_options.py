"""Engine flags of `serve` and `generate` reach the engine's config."""

import argparse

import pytest

from nvfp4kit.cli.engine_options import add_engine_arguments, llm_arguments


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_backend_flag_sets_the_engine_config(backend):
    assert llm_arguments(parse("--attention-backend", backend))["engine_config"].attention_backend == backend


def test_attention_backend_defaults_to_the_engines_choice():
    # None: $NVFP4KIT_ATTENTION_BACKEND, else triton on CUDA and torch on the CPU (engine/attention_backend.py)
    assert llm_arguments(parse())["engine_config"].attention_backend is None


def test_unknown_attention_backend_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--attention-backend", "flash")
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_serving_flags_reach_the_engine_config():
    flags = ("--admission-delay", "0", "--admission-tokens", "8192", "--prefill-graphs", "512,1024")
    config = llm_arguments(parse(*flags))["engine_config"]
    assert config.admission_delay == 0 and config.prefill_graphs == (512, 1024)
    assert config.admission_tokens == 8192
    default = llm_arguments(parse())["engine_config"]
    assert default.admission_delay is None and default.prefill_graphs is None  # both by device
    assert default.admission_tokens is None  # a whole step's tokens
    for off in ("none", "0"):
        assert llm_arguments(parse("--prefill-graphs", off))["engine_config"].prefill_graphs == ()


@pytest.mark.parametrize(("flag", "junk"), [("--prefill-graphs", "512,x"), ("--prefill-graphs", "512,-4"),
                                            ("--admission-delay", "-1")])  # fmt: skip
def test_junk_serving_flags_are_refused(capsys, flag, junk):
    with pytest.raises(SystemExit):
        parse(flag, junk)
    assert flag in capsys.readouterr().err


def test_kernel_cache_dir_flag_reaches_the_llm(tmp_path):
    assert llm_arguments(parse("--kernel-cache-dir", str(tmp_path)))["kernel_cache_dir"] == tmp_path
    assert llm_arguments(parse())["kernel_cache_dir"] is None  # $NVFP4KIT_CACHE_DIR, else ~/.cache
