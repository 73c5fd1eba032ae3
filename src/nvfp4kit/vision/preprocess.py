"""Gemma 4 image preprocessing with Pillow and torch (equal to transformers' `Gemma4ImageProcessor`).

An image is converted to RGB (transparency composited onto white), resized with bicubic filtering, keeping its
aspect ratio, to the largest size whose sides are multiples of `pooling_kernel_size * patch_size` and whose
patch count fits `max_soft_tokens * pooling_kernel_size**2`, rescaled to [0, 1] (no mean/std normalisation:
the tower maps pixels to [-1, 1] itself) and cut into row-major patches with their (x, y) grid positions.
Every image gets (height / patch / k) * (width / patch / k) soft tokens.

Pillow is imported lazily: it is only needed for image input (`pip install 'nvfp4kit[vision]'`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nvfp4kit.vision.config import ImageProcessorConfig

if TYPE_CHECKING:
    from PIL.Image import Image


MAX_PIXELS = 64 * 2**20  # refuse larger images (decompression bombs) before decoding them


class ImageError(ValueError):
    """An image that cannot be read or used (undecodable, empty, too large)."""


@dataclass(frozen=True)
class ProcessedImage:
    patches: torch.Tensor  # [num_patches, 3 * patch**2] float32 in [0, 1], each patch (row, col, channel)
    positions: torch.Tensor  # [num_patches, 2] int64 (x, y) patch coordinates, row-major
    num_soft_tokens: int


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - only without the extra
        raise ImportError("image input needs Pillow: pip install 'nvfp4kit[vision]'") from err
    return Image


def open_image(source: Any) -> Image:
    """A PIL image from a PIL image, encoded bytes (PNG/JPEG/WebP/...) or a file path; ImageError if unreadable."""
    pil = _pil()
    if isinstance(source, pil.Image):
        return source
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = pil.open(io.BytesIO(bytes(source)))
        elif isinstance(source, (str, Path)):
            image = pil.open(Path(source))
        else:
            raise ImageError(f"unsupported image input of type {type(source).__name__}")
        if image.width * image.height > MAX_PIXELS:  # checked from the header, before decoding
            raise ImageError(
                f"the image is too large: {image.width}x{image.height} pixels (at most {MAX_PIXELS})"
            )
        image.load()  # decode now, so a truncated file fails here and not later
    except ImageError:
        raise
    except (OSError, ValueError, pil.DecompressionBombError) as err:
        raise ImageError(f"cannot decode the image: {err}") from None
    return image


def to_rgb(image: Image) -> Image:
    pil = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = pil.new("RGBA", rgba.size, (255, 255, 255, 255))
        return pil.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """The largest aspect-preserving (height, width) within the patch budget, sides multiples of k * patch."""
    p, k, max_patches = cfg.patch_size, cfg.pooling_kernel_size, cfg.max_patches
    factor = math.sqrt(max_patches * p**2 / (height * width))
    side = k * p
    th, tw = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ImageError(f"cannot resize a {height}x{width} image to whole {side}-pixel cells")
    longest = (max_patches // k**2) * side
    if th == 0:  # very wide: one row of cells, as long as the budget allows
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    return th, tw


def preprocess_image(source: Any, cfg: ImageProcessorConfig) -> ProcessedImage:
    """Patches and positions of one image (PIL image, encoded bytes or path)."""
    pil = _pil()
    image = open_image(source)
    if image.width == 0 or image.height == 0:
        raise ImageError("the image is empty")
    image = to_rgb(image) if cfg.do_convert_rgb else image
    if image.mode != "RGB":
        raise ImageError(f"image mode {image.mode!r} is not RGB")
    th, tw = target_size(image.height, image.width, cfg)
    if (th, tw) != (image.height, image.width):
        image = image.resize((tw, th), resample=pil.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(th, tw, 3)
    # float64 then float32, as the reference rescales (bit-equal pixels)
    pixels = (pixels.double() * cfg.rescale_factor).float()
    p = cfg.patch_size
    ph, pw = th // p, tw // p
    patches = pixels.view(ph, p, pw, p, 3).permute(0, 2, 1, 3, 4).reshape(ph * pw, p * p * 3)
    ys, xs = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    return ProcessedImage(patches, positions, ph * pw // cfg.pooling_kernel_size**2)
