"""Images of a prompt are encoded in groups of at most one full-budget image's patches (the planned peak)."""

import torch

from nvfp4kit.vision.prompts import ImagePrompts, group_by_patches
from tests.vision.conftest import random_image


def test_groups_stay_within_the_budget_and_keep_order():
    assert group_by_patches([630, 630, 630], 630) == [[0], [1], [2]]
    assert group_by_patches([90, 90, 90, 630, 36], 630) == [[0, 1, 2], [3], [4]]
    assert group_by_patches([300, 200, 400], 630) == [[0, 1], [2]]  # 3 x 400 padded would be 1200
    assert group_by_patches([], 630) == []
    for sizes in ([10, 700, 10], [300] * 7, [1, 2, 3, 600, 5]):
        groups = group_by_patches(sizes, 630)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
        assert all(len(g) == 1 or len(g) * max(sizes[i] for i in g) <= 630 for g in groups)


def test_grouped_encoding_equals_each_image_alone(vision_checkpoint, monkeypatch):
    prompts = ImagePrompts.from_checkpoint(vision_checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    images = [random_image(60, 60, seed=1), random_image(12, 24, seed=2), random_image(24, 12, seed=3)]
    batches = []
    tower = prompts.tower
    monkeypatch.setattr(prompts, "tower", lambda p, xy: batches.append(len(p)) or tower(p, xy))
    together = prompts.encode(images)
    # Gemma 4's processor scales every image up to (nearly) its budget, so each image is a batch alone
    assert batches == [1, 1, 1]
    for image, features in zip(images, together):
        torch.testing.assert_close(prompts.encode([image])[0], features, rtol=1e-5, atol=1e-6)
