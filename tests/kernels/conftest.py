"""Fixtures shared by the kernel tests."""

import pytest


@pytest.fixture
def kernel_names(monkeypatch) -> list[str]:
    """Names of the Triton kernels launched while the test runs (every launch goes through `kernel[grid]`)."""
    import triton

    names: list[str] = []
    launch = triton.runtime.jit.KernelInterface.__getitem__

    def counted(kernel, grid):
        names.append(kernel.fn.__name__)
        return launch(kernel, grid)

    monkeypatch.setattr(triton.runtime.jit.KernelInterface, "__getitem__", counted)
    return names
