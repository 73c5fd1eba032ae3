"""The built-in demo model: strict loading, the real Gemma 4 design, and chats that make sense (greedy)."""

import json

import pytest
import torch

from nvfp4kit import LLM, SamplingParams, load_model
from nvfp4kit.demo import demo_model_path
from nvfp4kit.prompting.chat_template import load_chat_template
from nvfp4kit.testing.tiny import SPECIAL_TOKENS
from nvfp4kit.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}  # fmt: skip


@pytest.fixture(scope="module")
def llm():
    return LLM(demo_model_path())


def chat(llm, messages, *, thinking=False, tools=None, max_tokens=96):
    template = load_chat_template(llm.path)
    prompt = template.render(messages, tools=tools, template_kwargs={"enable_thinking": thinking})
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))[0]


def test_paths():
    assert (demo_model_path("bf16") / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="unknown demo model kind"):
        demo_model_path("fp8")


def test_real_gemma4_design_and_size():
    model = load_model(demo_model_path())  # strict: any missing or extra tensor is an error
    cfg = model.config
    assert cfg.layer_types.count("sliding_attention") == 5 * cfg.layer_types.count("full_attention")
    assert cfg.attention_k_eq_v and cfg.num_global_key_value_heads < cfg.num_key_value_heads
    assert cfg.global_head_dim > cfg.head_dim and cfg.rope_full.rope_type == "proportional"
    assert cfg.enable_moe_block and cfg.num_experts > cfg.top_k_experts > 0
    assert cfg.final_logit_softcapping and cfg.hidden_activation == "gelu_pytorch_tanh"
    params = sum(t.numel() for t in model.state_dict().values() if t is not None and t.is_floating_point())
    assert 10e6 < params < 30e6
    linears = [m for m in model.modules() if hasattr(m, "in_features")]
    assert linears and all(m.in_features % 16 == 0 for m in linears)
    assert cfg.moe_intermediate_size % 16 == 0
    raw = json.loads((demo_model_path() / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and cfg.eos_token_ids == (1, 106, 50)


def test_tokenizer_has_gemma4_control_tokens_at_their_ids():
    tok = Tokenizer(demo_model_path())
    for token_id, text in SPECIAL_TOKENS.items():
        assert tok.token_to_id(text) == token_id
    ids = tok.encode("<|turn>user\nHi<turn|>\n")
    assert ids[:2] == [2, 105] and 106 in ids


def test_matches_transformers(llm):
    import transformers

    hf = transformers.Gemma4ForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    ids = torch.tensor(Tokenizer(demo_model_path()).encode("def greet(name):\n    return f'Hello {name}'\n"))
    from nvfp4kit.model.contiguous_cache import ContiguousKVCache

    ours = load_model(demo_model_path(), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours(ids, ContiguousKVCache(ours.config).step(len(ids)))
    assert (got - ref).abs().max().item() < 1e-3


def test_greedy_chat_is_a_sensible_answer(llm):
    out = chat(llm, [{"role": "user", "content": "Hi"}])
    assert out.finish_reason == "stop" and out.token_ids[-1] == 106
    assert "Hello" in out.text and len(set(out.token_ids)) > 5


def test_thinking_emits_a_thought_channel_then_the_answer(llm):
    out = chat(llm, [{"role": "user", "content": "What is 47 + 38?"}], thinking=True)
    assert out.text.startswith("<|channel>thought\n") and "<channel|>" in out.text
    thought, answer = out.text.split("<channel|>", 1)
    assert "85" in thought and "85" in answer and out.finish_reason == "stop"


def test_tool_call_stops_at_tool_response(llm):
    out = chat(llm, [{"role": "user", "content": "What's the weather in Paris?"}], tools=[WEATHER])
    assert out.text.startswith('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>')
    assert out.token_ids[-1] == 50 and out.finish_reason == "stop"


def test_nvfp4_export_is_a_modelopt_checkpoint_that_still_chats():
    folder = demo_model_path("nvfp4")
    quant_config = json.loads((folder / "hf_quant_config.json").read_text())
    assert quant_config["quantization"]["quant_algo"] == "NVFP4"
    nvfp4 = LLM(folder)
    assert all(layer.self_attn.qkv_proj.quantized for layer in nvfp4.model.layers)
    # on a CPU the expanded weights are kept (not re-expanded every step): the demo decodes ~3x faster
    from nvfp4kit.model.layers import stored_weight

    kept = stored_weight(nvfp4.model.layers[0].experts, "gate_up").__dict__.get("_dense")
    assert kept is not None and kept.dtype == nvfp4.model.dtype
    out = chat(nvfp4, [{"role": "user", "content": "Hi"}], thinking=True)
    assert out.text.startswith("<|channel>thought\n") and "<channel|>Hello" in out.text
    assert out.finish_reason == "stop"
