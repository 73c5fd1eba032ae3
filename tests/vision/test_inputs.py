from types import SimpleNamespace

import pytest
import torch

from nvfp4kit.vision.config import load_multimodal_config
from nvfp4kit.vision.inputs import ImageInputs, image_step
from nvfp4kit.vision.prompts import expand_placeholders, split_prompt

SPANS = ((4, 10), (12, 15))  # two images: 6 and 3 soft tokens


def inputs(bidirectional=True):
    return ImageInputs(SPANS, torch.arange(9.0)[:, None].repeat(1, 2), bidirectional=bidirectional)


def test_chunks_never_end_inside_an_image():
    images = inputs()
    assert images.fit_chunk(0, 7) == 4  # stop before the first image
    assert images.fit_chunk(4, 3) == 0  # the image needs 6 tokens: wait for a bigger budget
    assert images.fit_chunk(4, 6) == 6
    assert images.fit_chunk(0, 11) == 11  # ends between the images
    assert images.fit_chunk(0, 13) == 12
    assert images.fit_chunk(0, 100) == 100
    assert inputs(bidirectional=False).fit_chunk(0, 7) == 7  # causal images may be split
    with pytest.raises(ValueError, match="does not fit one prefill chunk"):
        images.check_fits(5)


def test_step_rows_and_embeddings_of_two_requests():
    a = SimpleNamespace(images=inputs(), num_computed=2)  # chunk [2, 12): the whole first image
    b = SimpleNamespace(images=None, num_computed=0)
    c = SimpleNamespace(images=inputs(), num_computed=10)  # chunk [10, 16): the second image
    step = image_step([(a, 10), (b, 3), (c, 6)])
    assert step.rows.tolist() == [2, 3, 4, 5, 6, 7] + [15, 16, 17]  # c's rows start after a's 10 and b's 3
    assert step.embeds[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert step.spans == [((4, 10),), (), ((12, 15),)]
    assert image_step([(b, 3)]) is None


def test_placeholders_expand_with_config_ids(vision_checkpoint):
    cfg = load_multimodal_config(vision_checkpoint)
    img = cfg.image_token_id
    ids, spans = expand_placeholders([2, 7, img, 8, img], [3, 2], cfg)
    assert ids == [2, 7, cfg.boi_token_id, img, img, img, cfg.eoi_token_id, 8, cfg.boi_token_id, img, img,
                   cfg.eoi_token_id]  # fmt: skip
    assert spans == ((3, 6), (9, 11))
    assert cfg.bidirectional_images and cfg.processor.max_soft_tokens == 70


def test_dict_prompts_split_like_vllm():
    assert split_prompt("hi") == ("hi", [])
    assert split_prompt({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": "x.png"}}) == (
        [1, 2],
        ["x.png"],
    )
    with pytest.raises(ValueError, match="only images"):
        split_prompt({"prompt": "hi", "multi_modal_data": {"video": []}})
