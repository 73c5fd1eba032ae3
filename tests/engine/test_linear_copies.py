"""`--linear-copies`: which weights get BF16 copies, what the memory plan counts for them, when `auto` keeps them."""

from types import SimpleNamespace

import pytest
import torch

from nvfp4kit.config import load_config, load_preset
from nvfp4kit.demo import demo_model_path
from nvfp4kit.engine import linear_copies as lc
from nvfp4kit.model.layers import Linear
from nvfp4kit.model.loader import load_model
from nvfp4kit.plan.checkpoint import linear_copy_bytes_from_checkpoint
from nvfp4kit.plan.weights import linear_copy_bytes


def test_copy_bytes_from_headers_and_config_match_the_loaded_linears():
    folder = demo_model_path("nvfp4")
    model = load_model(folder, dtype=torch.bfloat16, device="cpu")
    quantized = [m for m in model.modules() if isinstance(m, Linear) and m.quantized]
    expected = sum(2 * m.out_features * m.in_features for m in quantized)
    assert expected > 0
    assert linear_copy_bytes_from_checkpoint(folder) == expected
    assert linear_copy_bytes(load_config(folder)) == expected


def test_copy_bytes_skip_linears_already_in_bf16():
    cfg = load_preset("gemma-4-26b-a4b")
    all_nvfp4 = linear_copy_bytes(cfg)
    assert 3.0 * 2**30 < all_nvfp4 < 3.2 * 2**30  # the 26B-A4B figure the --help quotes (3.3 GB)
    assert linear_copy_bytes(cfg, recipe="attention-bf16") < all_nvfp4 / 2  # attention is most of it
    assert linear_copy_bytes(cfg, recipe="experts-only") == 0


@pytest.fixture
def card(monkeypatch):
    """A CUDA card of a chosen size, without a GPU."""

    def set_total(gib: float) -> None:
        props = SimpleNamespace(total_memory=int(gib * 2**30))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)

    return set_total


def test_auto_keeps_copies_on_large_cards_only(card):
    copies = linear_copy_bytes(load_preset("gemma-4-26b-a4b"))
    card(79.2)  # an H100 80GB
    assert lc.linear_copies_to_keep("auto", device="cuda", copy_bytes=copies)
    assert not lc.linear_copies_to_keep("auto", device="cuda", copy_bytes=copies, tensor_parallel_size=2)
    assert not lc.linear_copies_to_keep("off", device="cuda", copy_bytes=copies)
    card(23.6)  # an RTX 3090 / 4090: the KV cache needs the memory
    assert not lc.linear_copies_to_keep("auto", device="cuda", copy_bytes=copies)
    assert lc.linear_copies_to_keep("on", device="cuda", copy_bytes=copies)  # asked for: kept anyway
    assert lc.linear_copies_to_keep(True, device="cuda", copy_bytes=copies)
    card(141.0)  # an H200 running as a 24 GB card (--gpu-memory-budget 24GiB): sized as that card
    assert lc.linear_copies_to_keep("auto", device="cuda", copy_bytes=copies)
    assert not lc.linear_copies_to_keep("auto", device="cuda", copy_bytes=copies, card_bytes=24 * 2**30)


def test_cpu_and_bad_settings():
    assert not lc.linear_copies_to_keep("auto", device="cpu", copy_bytes=10)
    with pytest.raises(ValueError, match="CUDA"):
        lc.linear_copies_to_keep("on", device="cpu", copy_bytes=10)
    with pytest.raises(ValueError, match="tensor parallel"):
        lc.linear_copies_to_keep("on", device="cuda", copy_bytes=10, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="one of"):
        lc.linear_copies_to_keep("sometimes", device="cpu", copy_bytes=10)


def test_the_memory_plan_counts_the_copies_before_loading(monkeypatch):
    """The copies come out of the KV cache: the plan holds them beside the checkpoint's weights."""
    from nvfp4kit.engine.engine import EngineConfig
    from nvfp4kit.engine.sizing import DeviceMemory, MemoryOptions, plan_checkpoint_memory
    from nvfp4kit.plan.units import GiB

    folder = demo_model_path("nvfp4")
    card = DeviceMemory(total_bytes=8 * GiB, free_bytes=8 * GiB, name="fake")
    monkeypatch.setattr("nvfp4kit.engine.sizing.measure_device_memory", lambda device: card)
    config = EngineConfig(max_num_batched_tokens=512, max_model_len=2048)

    def plan(copies: int):
        return plan_checkpoint_memory(
            folder, device="cpu", model_dtype=torch.bfloat16, config=config, options=MemoryOptions(),
            copies_bytes=copies,
        )  # fmt: skip

    copies = linear_copy_bytes_from_checkpoint(folder)
    without, with_copies = plan(0), plan(copies)
    assert with_copies.pool.weights_bytes - without.pool.weights_bytes == copies
    assert without.kv_cache_memory - with_copies.kv_cache_memory == copies


def test_nvfp4kit_plan_holds_the_copies_where_the_engine_would_keep_them():
    from nvfp4kit.plan.report import build_plan

    h100 = {mode: build_plan("gemma-4-26b-a4b", gpu="h100", linear_copies=mode) for mode in ("auto", "off")}
    copies = h100["auto"]["weights"]["linear_copies_bytes"]
    assert copies == linear_copy_bytes(load_preset("gemma-4-26b-a4b"))
    assert h100["off"]["weights"]["linear_copies_bytes"] == 0
    kv = {mode: plan["nvfp4kit"]["kv_budget_bytes"] for mode, plan in h100.items()}
    assert kv["off"] - kv["auto"] == copies
    rtx = build_plan("gemma-4-26b-a4b", gpu="RTX 3090")  # the seed card's: its memory goes to the KV cache
    assert rtx["weights"]["linear_copies_bytes"] == 0


def test_llm_refuses_copies_on_the_cpu_before_loading(tiny_checkpoint):
    from nvfp4kit import LLM

    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLM(tiny_checkpoint("moe"), linear_copies="on")
    llm = LLM(tiny_checkpoint("moe"))  # auto: the CPU keeps its own expanded copies, not these
    assert llm.linear_copies is False
    llm.close()


def test_only_a_bf16_model_keeps_copies(card):
    card(79.2)
    copies = linear_copy_bytes(load_preset("gemma-4-26b-a4b"))
    keep = lc.linear_copies_to_keep("auto", device="cuda", copy_bytes=copies, model_dtype=torch.bfloat16)
    assert keep == copies
    assert lc.linear_copies_to_keep("on", device="cuda", copy_bytes=copies, model_dtype=torch.float16) == 0
