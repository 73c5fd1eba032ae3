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
