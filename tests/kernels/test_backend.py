"""The `triton` op backend: registration, dispatch, and a whole NVFP4 model agreeing with the torch backend."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from nvfp4kit.config import config_from_dict
from nvfp4kit.kernels.backend import TritonBackend
from nvfp4kit.model.contiguous_cache import ContiguousKVCache
from nvfp4kit.model.ops import TorchBackend, available_backends, select_backend
from nvfp4kit.testing.random_model import random_model
from nvfp4kit.testing.tiny import tiny_text_config

from .helpers import DEVICE, random_weight, rel_error

pytestmark = pytest.mark.cuda(also_cpu=True)  # natively on a GPU with -m cuda, interpreted on the CPU


def test_backend_is_registered_and_selectable():
    assert "triton" in available_backends()
    assert isinstance(select_backend(DEVICE, "triton"), TritonBackend)
    if DEVICE.type == "cuda":
        assert isinstance(select_backend(DEVICE), TritonBackend)


def test_linear_dispatch_dense_and_nvfp4():
    backend = TritonBackend()
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    dense = torch.randn(24, 64, device=DEVICE)
    assert torch.equal(backend.linear(x, dense), F.linear(x, dense.bfloat16()))
    weight = random_weight(24, 64, seed=11)
    assert rel_error(backend.linear(x.float(), weight), TorchBackend().linear(x.float(), weight)) < 1e-5


def test_tiny_nvfp4_model_matches_torch_backend():
    cfg = config_from_dict(tiny_text_config("moe"))
    tokens = torch.arange(2, 9, device=DEVICE)
    logits = {}
    for name, backend in (("torch", TorchBackend()), ("triton", TritonBackend())):
        model = random_model(cfg, quantized=True, dtype=torch.float32, device=DEVICE, backend=backend, seed=3)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logits[name] = model(tokens, ContiguousKVCache(cfg).step(tokens.numel(), device=DEVICE))
    assert rel_error(logits["triton"], logits["torch"]) < 1e-4
