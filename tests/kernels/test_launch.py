"""Programmatic dependent launch settings (kernels/launch.py): off on the CPU, modes checked, env parsed."""

import pytest
import torch

from nvfp4kit.kernels import launch


@pytest.fixture(autouse=True)
def _fresh_mode():
    launch.set_pdl_mode(None)
    yield
    launch.set_pdl_mode(None)


def test_cpu_and_interpreter_launches_never_ask_for_pdl(monkeypatch):
    monkeypatch.setenv("NVFP4KIT_PDL", "2")
    launch.set_pdl_mode(None)  # drop what an earlier env produced
    assert launch.pdl_args(torch.device("cpu")) == {"PDL": 0}
    assert launch.pdl_mode(torch.device("cpu")) == 0


@pytest.mark.parametrize(
    ("raw", "mode"), [("0", 0), ("off", 0), ("1", 1), ("wait", 1), ("2", 2), ("early", 2)]
)
def test_env_values(monkeypatch, raw, mode):
    monkeypatch.setenv("NVFP4KIT_PDL", raw)
    assert launch._env_mode() == mode


def test_bad_env_value_and_bad_mode_say_what_is_allowed(monkeypatch):
    monkeypatch.setenv("NVFP4KIT_PDL", "fast")
    with pytest.raises(ValueError, match="0 \\(off\\), 1 \\(wait\\) or 2 \\(early\\)"):
        launch._env_mode()
    with pytest.raises(ValueError, match="0, 1 or 2"):
        launch.set_pdl_mode(3)
