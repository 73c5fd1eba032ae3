"""`nvfp4kit generate --image PATH`: the same tokens as `LLM.chat` with the same image, clear errors."""

import ast

import PIL  # noqa: F401  (pillow is a test extra: CI fails, not skips, without it)
import pytest

from nvfp4kit.cli import main


@pytest.fixture(scope="module")
def vision_folder(tiny_checkpoint):
    return tiny_checkpoint("moe", multimodal=True, vision=True)


def write_png(path, seed: int, size=(30, 20)):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def test_generate_with_images_equals_llm_chat_with_pil_images(vision_folder, tmp_path, capsys):
    from PIL import Image

    from nvfp4kit import LLM, SamplingParams

    files = [write_png(tmp_path / "a.png", 1), write_png(tmp_path / "b.webp", 2, size=(16, 40))]
    argv = ["generate", str(vision_folder), "--prompt", "Compare these.", "--max-tokens", "6", "--temperature",
            "0", "--show-ids"]  # fmt: skip
    assert main([*argv, "--image", str(files[0]), "--image", str(files[1])]) == 0
    shown = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])

    images = [Image.open(f) for f in files]
    parts = [{"type": "image_pil", "image_pil": image} for image in images]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare these."}]}]
    with LLM(vision_folder) as llm:
        out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert shown == out.token_ids and len(shown) == 6
    assert out.prompt.count("<|image|>") == 2  # both images reached the template as placeholders


def test_bad_images_and_text_only_checkpoints_are_one_line_errors(
    vision_folder, tiny_checkpoint, tmp_path, capsys
):
    def error(folder, image, *extra):
        assert main(["generate", str(folder), "--prompt", "hi", "--image", str(image), *extra]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "no such file" in error(vision_folder, tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    assert "cannot decode the image" in error(vision_folder, junk)
    png = write_png(tmp_path / "ok.png", 3)
    assert "text-only checkpoint" in error(tiny_checkpoint("moe"), png)
    assert "--language-model-only" in error(vision_folder, png, "--language-model-only")
