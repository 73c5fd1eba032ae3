"""Image content parts through the built-in chat template and prompt assembly give the token sequence Google's
Gemma 4 template + transformers' Gemma4Processor give.

What Google's template does with content parts (its later revisions, the ones with `<|think|>\\n` and the
OpenAI tool-message scan; see docs/vision.md for the sources): each text part is trimmed, each image part becomes
the bare placeholder `<|image|>`, parts are joined with nothing between them. (The launch revision wrapped the
placeholder as `\\n\\n<|image|>\\n\\n`; later ones dropped the newlines.) The processor then replaces each
`<|image|>` with `<|image>` + N x `<|image|>` + `<image|>`, nothing added around it. The expected prompts below
are written out by hand from those rules.
"""

import pytest
import torch

from nvfp4kit.prompting.chat_template import load_chat_template
from nvfp4kit.tokenizer import Tokenizer
from nvfp4kit.vision.config import load_multimodal_config
from nvfp4kit.vision.prompts import expand_placeholders

GEN = "<|turn>model\n<|channel>thought\n<channel|>"  # generation prompt, thinking off (large variants)
CASES = [
    ([{"type": "image"}, {"type": "text", "text": " Describe it. "}],
     f"<bos><|turn>user\n<|image|>Describe it.<turn|>\n{GEN}"),
    ([{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and\n"}, {"type": "image"}],
     f"<bos><|turn>user\nCompare<|image|>and<|image|><turn|>\n{GEN}"),
    ([{"type": "text", "text": "First"}, {"type": "text", "text": " second"}],
     f"<bos><|turn>user\nFirstsecond<turn|>\n{GEN}"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "official"), CASES)
def test_image_parts_render_as_googles_template_does(vision_checkpoint, content, official):
    template = load_chat_template(vision_checkpoint)
    assert template.render([{"role": "user", "content": content}]) == official


def test_a_follow_up_turn_and_thinking_keep_the_bare_placeholder(vision_checkpoint):
    template = load_chat_template(vision_checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " A cat. "}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "image"}]},
    ]
    official = ("<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\n<|image|>What?<turn|>\n"
                "<|turn>model\nA cat.<turn|>\n<|turn>user\nSure?<|image|><turn|>\n<|turn>model\n")  # fmt: skip
    assert template.render(messages, template_kwargs={"enable_thinking": True}) == official


def test_expanded_tokens_equal_the_processors_expansion_of_the_official_prompt(vision_checkpoint):
    """Token ids, not only text: our rendered prompt expanded by `expand_placeholders` equals the official string
    with each `<|image|>` replaced as Gemma4Processor does, tokenized."""
    tokenizer = Tokenizer(vision_checkpoint)
    cfg = load_multimodal_config(vision_checkpoint)
    content, official = CASES[1]
    ours = load_chat_template(vision_checkpoint).render([{"role": "user", "content": content}])
    soft = [70, 12]  # soft tokens of the two images
    ids, spans = expand_placeholders(tokenizer.encode(ours), soft, cfg)
    first, second = (f"<|image>{'<|image|>' * n}<image|>" for n in soft)
    processed = official.replace("<|image|>", first, 1).replace(
        "<|image|>" + "<turn|>", second + "<turn|>", 1
    )
    assert ids == tokenizer.encode(processed)
    assert [b - a for a, b in spans] == soft
    image_ids = torch.tensor(ids)
    assert int((image_ids == cfg.image_token_id).sum()) == sum(soft)
    assert int((image_ids == cfg.boi_token_id).sum()) == int((image_ids == cfg.eoi_token_id).sum()) == 2
