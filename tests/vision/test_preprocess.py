import io

import pytest
import torch

from nvfp4kit.testing.tiny_config import TINY_IMAGE_PROCESSOR
from nvfp4kit.vision.config import ImageProcessorConfig
from nvfp4kit.vision.preprocess import ImageError, preprocess_image
from tests.vision.conftest import random_image

CFG = ImageProcessorConfig(
    patch_size=TINY_IMAGE_PROCESSOR["patch_size"],
    pooling_kernel_size=TINY_IMAGE_PROCESSOR["pooling_kernel_size"],
    max_soft_tokens=TINY_IMAGE_PROCESSOR["max_soft_tokens"],
)


@pytest.mark.parametrize(
    "height, width, mode",
    [(50, 90, "RGB"), (300, 200, "RGBA"), (12, 500, "L"), (84, 84, "RGB"), (7, 9, "RGB"), (600, 10, "RGB")],
)
def test_patches_and_positions_equal_transformers(hf_image_processor, height, width, mode):
    image = random_image(height, width, mode)
    ref = hf_image_processor([image], return_tensors="pt")
    ours = preprocess_image(image, CFG)
    pixels, positions = ref["pixel_values"][0], ref["image_position_ids"][0]
    n = ours.patches.shape[0]
    assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0]) == n // 9
    assert torch.equal(ours.patches, pixels[:n])  # bit-equal pixels
    assert torch.equal(ours.positions, positions[:n])
    assert bool((positions[n:] == -1).all())  # the rest is the reference's padding


def test_encoded_bytes_decode_like_the_image():
    image = random_image(40, 64)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    from_bytes = preprocess_image(buf.getvalue(), CFG)
    assert torch.equal(from_bytes.patches, preprocess_image(image, CFG).patches)


def test_undecodable_bytes_are_a_clear_error():
    with pytest.raises(ImageError, match="cannot decode"):
        preprocess_image(b"\x89PNG\r\n not really a png", CFG)
    with pytest.raises(ImageError, match="unsupported image input"):
        preprocess_image(12345, CFG)
