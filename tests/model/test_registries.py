"""The op-backend and checkpoint-format tables: a missing optional package hides an entry, a bug raises."""

from __future__ import annotations

import sys

import pytest

from nvfp4kit.formats import weight_source
from nvfp4kit.formats.safetensors_io import CheckpointError
from nvfp4kit.model import ops


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write a module `name` with `source` where imports find it."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


def test_a_backend_without_its_optional_package_is_not_available(module, monkeypatch):
    name = module(
        "nvfp4kit_test_backend", "import nvfp4kit_no_such_package\nclass Backend:\n    name = 'x'\n"
    )
    monkeypatch.setitem(ops.BACKENDS, "x", (f"{name}:Backend", "nvfp4kit_no_such_package"))
    assert "x" not in ops.available_backends()
    with pytest.raises(ValueError, match=r"unknown op backend 'x'; available: \[.*'torch'"):
        ops.select_backend("cpu", "x")


@pytest.mark.parametrize(
    "source",
    [
        "from nvfp4kit.model.ops import NoSuchName\n",  # a bug in the backend's module
        "import nvfp4kit_other_missing_package\n",  # a missing dependency that is not the optional one
    ],
)
def test_a_backend_that_fails_to_import_for_another_reason_raises(module, monkeypatch, source):
    name = module("nvfp4kit_test_broken_backend", source)
    monkeypatch.setitem(ops.BACKENDS, "broken", (f"{name}:Backend", "nvfp4kit_no_such_package"))
    with pytest.raises(ImportError, match="NoSuchName|nvfp4kit_other_missing_package"):
        ops.select_backend("cpu", "broken")
    with pytest.raises(ImportError):
        ops.available_backends()


def test_torch_is_always_available():
    assert "torch" in ops.available_backends()
    assert ops.select_backend("cpu").name == "torch"


def test_a_bug_in_a_checkpoint_format_raises_instead_of_hiding_the_format(module, monkeypatch, tmp_path):
    name = module("nvfp4kit_test_broken_format", "from nvfp4kit.formats.nvfp4 import NoSuchName\n")
    monkeypatch.setitem(weight_source.FORMATS, "broken", f"{name}:Source")
    with pytest.raises(ImportError, match="NoSuchName"):  # before: "unsupported quantization ...: []"
        weight_source.select_source_class(tmp_path, {"quantization_config": {"quant_method": "other"}})


def test_an_unknown_quantization_names_the_supported_formats(tmp_path):
    with pytest.raises(
        CheckpointError, match=r"supported formats: \['compressed-tensors-nvfp4', 'modelopt-nvfp4'\]"
    ):
        weight_source.select_source_class(tmp_path, {"quantization_config": {"quant_method": "other"}})
    assert weight_source.select_source_class(tmp_path, {}) is weight_source.WeightSource
