"""Images through the OpenAI API: content parts, data URLs, the running server and its 400s."""

import base64
import io
from types import SimpleNamespace

import pytest

from nvfp4kit.vision.openai_parts import ImagePartError, attach_images, extract_images
from tests.vision.conftest import random_image


def png_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": list(parts)}]


def test_image_parts_become_placeholders_in_order():
    first, second = png_url(random_image(8, 8, seed=1)), png_url(random_image(9, 9, seed=2), "JPEG")
    messages, images = extract_images(
        user(
            {"type": "image_url", "image_url": {"url": first}},
            {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": second},
        )  # fmt: skip
    )
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [p["type"] for p in messages[1]["content"]] == ["image", "text", "image"]
    assert images[0] == base64.b64decode(first.split(",")[1]) and len(images) == 2


@pytest.mark.parametrize(
    "part, message",
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "not fetched"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "must be a data: URL"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
        ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "not an image"),
        ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, "base64-encoded"),
        ({"type": "image_url", "image_url": {}}, "needs image_url.url"),
        (
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
            "audio input is not supported",
        ),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "video input"),
    ],
)
def test_bad_parts_are_refused_with_their_place(part, message):
    with pytest.raises(ImagePartError, match=message) as err:
        extract_images(user({"type": "text", "text": "look"}, part))
    assert err.value.param == "messages[1].content[1]"


def test_limits_on_count_and_size():
    url = png_url(random_image(8, 8))
    with pytest.raises(ImagePartError, match="too many images"):
        extract_images(user(*[{"type": "image_url", "image_url": {"url": url}}] * 3), max_images=2)
    with pytest.raises(ImagePartError, match="larger than 10 bytes"):
        extract_images(user({"type": "image_url", "image_url": {"url": url}}), max_image_bytes=10)


def test_text_only_model_refuses_images():
    with pytest.raises(ImagePartError, match="no vision tower"):
        attach_images(SimpleNamespace(), [2, 5], [b"png"])
    with pytest.raises(ImagePartError, match="no vision tower"):
        attach_images(SimpleNamespace(image_prompts=lambda: None), [2, 5], [b"png"])


@pytest.fixture(scope="module")
def image_server(vision_checkpoint):
    from tests.serve.conftest import start_server, stop_server

    process, base_url = start_server(vision_checkpoint)
    yield base_url
    stop_server(process)


def test_openai_client_chat_with_a_data_url_equals_llm_generate(image_server, vision_checkpoint):
    from openai import BadRequestError, OpenAI

    from nvfp4kit import LLM, SamplingParams
    from nvfp4kit.prompting.chat_template import load_chat_template

    image = random_image(50, 90, seed=1)
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": png_url(image)}},
    ]
    client = OpenAI(base_url=image_server + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model=vision_checkpoint.name, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=8, logprobs=True,
    )  # fmt: skip
    # the same prompt through the Python API: the template renders the image part as its placeholder
    llm = LLM(vision_checkpoint)
    template_messages = [{"role": "user", "content": [content[0], {"type": "image"}]}]
    ids = llm.tokenizer.encode(load_chat_template(vision_checkpoint).render(template_messages))
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
    assert reply.usage.prompt_tokens == len(out.prompt_token_ids) > len(ids) + 60  # 66 soft tokens + boi/eoi
    assert [t.token for t in reply.choices[0].logprobs.content] == [
        llm.tokenizer.decode([t]) for t in out.token_ids
    ]
    # LLM.chat takes the same content parts, and PIL images in vLLM's image_pil parts
    for part in (content[1], {"type": "image_pil", "image_pil": image}):
        messages = [{"role": "user", "content": [content[0], part]}]
        chat = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        assert chat[0].token_ids == out.token_ids
    with pytest.raises(BadRequestError, match="cannot decode the image"):
        bad = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
        client.chat.completions.create(
            model=vision_checkpoint.name, max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}],
        )  # fmt: skip
    with pytest.raises(BadRequestError, match="not fetched"):
        client.chat.completions.create(
            model=vision_checkpoint.name, max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )  # fmt: skip
    assert client.chat.completions.create(
        model=vision_checkpoint.name, max_tokens=2, messages=[{"role": "user", "content": "still serving?"}]
    ).choices[0].finish_reason in ("stop", "length")
