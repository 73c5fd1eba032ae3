import os

import torch

# Triton kernels are checked on the CPU through the interpreter (tiny shapes); must be set before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# `pytest -n N` (pytest-xdist): N worker processes share the cores; torch's default of a thread per core in each
# would oversubscribe them (most of the suite is the single-threaded Triton interpreter anyway).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU: without one they are skipped, with the reason, unless marked `also_cpu`
    (kernel tests the Triton interpreter runs on the CPU; `-m cuda` runs them natively on the card)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU: there, python3 -m pytest -m cuda tests/gpu tests/kernels tests/engine"
    )
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is not None and not marker.kwargs.get("also_cpu", False):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(shape="moe", dtype=torch.float32, multimodal=False, **overrides) -> folder.

    Checkpoints are written once per session and argument set; treat them as read-only.
    """
    from nvfp4kit.testing.tiny import write_tiny_checkpoint

    made = {}

    def make(shape="moe", dtype=torch.float32, multimodal=False, **overrides):
        key = (shape, str(dtype), multimodal, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny_{shape}")
            made[key] = write_tiny_checkpoint(
                folder, shape=shape, dtype=dtype, multimodal=multimodal, **overrides
            )
        return made[key]

    return make


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global RNG state: unseeded random inputs do not depend on test order."""
    torch.manual_seed(0)
