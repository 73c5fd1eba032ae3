"""OpenAI chat content parts with images: `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.

`extract_images(messages)` returns the messages with each image part replaced by `{"type": "image"}` (what chat
templates render as the image placeholder) and the images' encoded bytes, in prompt order. Only inline
`data:` URLs are accepted: the server fetches nothing from the network. Audio and video parts are refused.
Every problem is an `ImagePartError` naming the offending part, for a 400 answer.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

DEFAULT_MAX_IMAGES = 8  # per request
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20  # per image, decoded
_UNSUPPORTED = {
    "input_audio": "audio",
    "audio_url": "audio",
    "audio": "audio",
    "video_url": "video",
    "video": "video",
}


class ImagePartError(ValueError):
    """A content part the server cannot take; `param` locates it (e.g. messages[0].content[1])."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def decode_data_url(url: str, *, where: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a base64 `data:image/...;base64,` URL."""
    if url.startswith(("http://", "https://")):
        raise ImagePartError(
            "image URLs are not fetched (no network access); send the image inline as a "
            "data:image/png;base64,... URL",
            where,
        )
    if not url.startswith("data:"):
        raise ImagePartError("an image URL must be a data: URL (data:image/png;base64,...)", where)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImagePartError("the data: URL has no ',' before its data", where)
    media, *options = header.split(";")
    if media and not media.lower().startswith("image/"):
        raise ImagePartError(f"the data: URL holds {media!r}, not an image", where)
    if "base64" not in (o.lower() for o in options):
        raise ImagePartError("the image data: URL must be base64-encoded (data:image/png;base64,...)", where)
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:  # refuse before decoding a huge payload
        raise ImagePartError(f"the image is larger than {max_bytes} bytes", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImagePartError("the image data: URL is not valid base64", where) from None
    if not data:
        raise ImagePartError("the image data: URL is empty", where)
    return data


def extract_images(
    messages: list[dict[str, Any]],
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_objects: bool = False,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with image parts turned into `{"type": "image"}`, and the images' bytes in order.

    `allow_objects` (Python callers, never the server): also vLLM's `{"type": "image_pil", "image_pil": img}`
    and `{"type": "image", "image": img}` parts holding a PIL image, encoded bytes or a path."""
    images: list[Any] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _UNSUPPORTED:
                raise ImagePartError(
                    f"{_UNSUPPORTED[kind]} input is not supported; send text and images", where
                )
            held = part.get("image_pil", part.get("image")) if kind in ("image_pil", "image") else None
            if allow_objects and held is not None:
                if len(images) == max_images:
                    raise ImagePartError(f"too many images: at most {max_images} per request", where)
                images.append(held)
                parts.append({"type": "image"})
                continue
            if kind != "image_url":
                parts.append(part)
                continue
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ImagePartError("an image_url part needs image_url.url (a data: URL)", where)
            if len(images) == max_images:
                raise ImagePartError(f"too many images: at most {max_images} per request", where)
            images.append(decode_data_url(url, where=where, max_bytes=max_image_bytes))
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images


def attach_images(engine: Any, prompt_ids: list[int], images: list[bytes]) -> tuple[list[int], Any]:
    """Expand the rendered prompt's image placeholders and encode the images with the engine's vision tower
    (`engine.image_prompts()`, absent or None for a text-only model); problems become `ImagePartError`s."""
    from nvfp4kit.vision.preprocess import ImageError

    loader = getattr(engine, "image_prompts", None)
    prompts = loader() if loader is not None else None
    if prompts is None:
        raise ImagePartError(
            "this model takes text only (no vision tower, or images off with --language-model-only)",
            "messages",
        )
    try:
        return prompts.build(prompt_ids, images)
    except ImageError as exc:
        raise ImagePartError(str(exc), "messages") from None
    except ValueError as exc:  # placeholders and images do not pair up, or an image is longer than a chunk
        raise ImagePartError(str(exc), "messages") from None
