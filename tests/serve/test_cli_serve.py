"""The `nvfp4kit serve` command: its message without a model, and a graceful SIGTERM."""

import signal
import threading
import time

import httpx

from nvfp4kit.cli import main

from .conftest import start_server, stop_server


def test_serve_without_a_model_serves_the_nvfp4_demo():
    from nvfp4kit.cli.serve import resolve_model
    from nvfp4kit.demo import demo_model_path

    folder, name = resolve_model(None)
    assert folder == demo_model_path("nvfp4") and name == "nvfp4kit-demo"
    assert (folder / "hf_quant_config.json").is_file()


def test_serve_on_a_folder_without_a_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 1
    assert "not a model folder (no config.json there)" in capsys.readouterr().err


def test_sigterm_lets_the_running_request_finish(tiny_checkpoint):
    process, base_url = start_server(tiny_checkpoint, "--dtype", "float32", "--max-model-len", "1024")
    result: dict = {}

    def long_request() -> None:
        body = {"model": "tiny-gemma4", "prompt": "Go", "max_tokens": 600, "ignore_eos": True}
        result["response"] = httpx.post(base_url + "/v1/completions", json=body, timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 30
    while "nvfp4kit_num_requests_running 1" not in httpx.get(base_url + "/metrics").text:
        assert time.monotonic() < deadline and worker.is_alive(), "the request never started"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert stop_server(process) == 0
    response = result["response"]
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 600
    assert "Shutting down" in process.stdout.read()


def test_an_empty_api_key_is_refused_before_loading(capsys):
    assert main(["serve", "--api-key", " "]) == 1
    assert "--api-key" in capsys.readouterr().err


def test_serve_help_lists_the_limits(capsys):
    try:
        main(["serve", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "--max-body-size" in out and "--public-metrics" in out and "--tune" in out
