import numpy as np
import PIL  # noqa: F401  (pillow and transformers are test extras: CI fails, not skips, without them)
import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def vision_checkpoint(tiny_checkpoint):
    """A tiny random multimodal Gemma 4 (MoE text tower, 2-layer vision tower), fp32."""
    return tiny_checkpoint("moe", multimodal=True, vision=True)


@pytest.fixture(scope="session")
def hf_vision_model(vision_checkpoint):
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        vision_checkpoint, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_image_processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from nvfp4kit.testing.tiny_config import TINY_IMAGE_PROCESSOR

    keys = ("patch_size", "max_soft_tokens", "pooling_kernel_size")
    return Gemma4ImageProcessorPil(**{k: TINY_IMAGE_PROCESSOR[k] for k in keys})


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0):
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)
