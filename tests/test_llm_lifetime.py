"""`LLM.close()`, `with LLM(...)` and `del llm` free the engine: nothing keeps it alive through a reference
cycle (on a GPU that would pin the KV pool and the CUDA graphs until a garbage collection that may never come)."""

import gc
import weakref

import pytest

from nvfp4kit import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture
def no_gc():
    """Reference cycles are only freed by the collector: with it off, a freed object proves there are none."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def held(llm):
    return [weakref.ref(obj) for obj in (llm.engine, llm.engine.cache, llm.model)]


def test_close_frees_the_engine_cache_and_model(tiny_checkpoint, no_gc):
    llm = LLM(tiny_checkpoint("moe"))
    llm.generate("Hello", GREEDY)
    refs = held(llm)
    llm.close()
    assert [ref() for ref in refs] == [None, None, None]
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("Hello", GREEDY)
    llm.close()  # twice is harmless


def test_del_and_with_free_everything(tiny_checkpoint, no_gc):
    llm = LLM(tiny_checkpoint("moe"))
    llm.generate("Hello", GREEDY)
    refs = held(llm) + [weakref.ref(llm)]
    del llm
    assert [ref() for ref in refs] == [None] * 4
    with LLM(tiny_checkpoint("moe")) as llm:
        first = llm.generate("Hello", GREEDY)[0].token_ids
        refs = held(llm)
    assert [ref() for ref in refs] == [None, None, None]
    with LLM(tiny_checkpoint("moe")) as again:  # a second engine in the same process gives the same tokens
        assert again.generate("Hello", GREEDY)[0].token_ids == first


def test_close_drops_the_expanded_weight_scratch(tiny_checkpoint):
    import torch

    from nvfp4kit.kernels import dequant

    llm = LLM(tiny_checkpoint("moe"))
    dequant.scratch(torch.device("cpu"), torch.float32, (64, 64))  # as a prefill-sized GEMM leaves it
    assert dequant.scratch_bytes() > 0
    llm.close()
    assert dequant.scratch_bytes() == 0
