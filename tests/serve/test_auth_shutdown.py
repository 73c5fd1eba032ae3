"""API-key checks (scheme, header, which routes it guards, empty keys) and graceful shutdown (503 at once,
bounded drain, streams end with finish_reason "abort" and [DONE], exit 0 without tracebacks)."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from nvfp4kit.prompting.chat_template import load_chat_template
from nvfp4kit.serve.app import create_app

from .conftest import ScriptedEngine, free_port, wait_healthy

KEY = "s3cret"
CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}]}


def test_bearer_scheme_is_case_insensitive_and_401_says_how(scripted_server):
    base_url, _ = scripted_server(lambda prompt: "ok", api_key=KEY)
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = httpx.post(
            base_url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"{scheme} {KEY}"}
        )
        assert response.status_code == 200, scheme
    refused = httpx.post(
        base_url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Basic s3cret"}
    )
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")


def test_metrics_and_openapi_are_behind_the_key(scripted_server):
    base_url, _ = scripted_server(lambda prompt: "ok", api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    for route in ("/metrics", "/openapi.json"):
        assert httpx.get(base_url + route).status_code == 401, route
        assert httpx.get(base_url + route, headers=auth).status_code == 200, route
    assert httpx.get(base_url + "/docs", headers=auth).status_code == 404  # the HTML docs cannot send a key
    assert httpx.get(base_url + "/health").status_code == 200
    open_url, _ = scripted_server(lambda prompt: "ok", api_key=KEY, public_metrics=True)
    assert httpx.get(open_url + "/metrics").status_code == 200


def test_an_empty_key_is_refused_and_the_auth_state_is_logged(tiny_checkpoint, caplog):
    engine = ScriptedEngine(tiny_checkpoint, lambda prompt: "ok")
    template = load_chat_template(tiny_checkpoint)
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="API key is empty"):
            create_app(engine, template=template, model_names=["m"], api_key=empty)
    with caplog.at_level(logging.INFO, logger="nvfp4kit.serve.app"):
        create_app(engine, template=template, model_names=["m"], api_key=KEY)
        create_app(engine, template=template, model_names=["m"])
    assert "authentication is on" in caplog.text and "authentication is off" in caplog.text


def read_stream(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_drain_answers_503_at_once_and_ends_streams_with_abort(scripted_server):
    base_url, engine = scripted_server(lambda prompt: "word " * 300, drain_timeout=0.3)
    engine.token_delay = 0.02
    events: list[str] = []
    first_chunk = threading.Event()

    def stream():
        body = {**CHAT, "stream": True}
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert first_chunk.wait(10)
    app = engine.app
    app.state.loop.call_soon_threadsafe(app.state.drainer.begin)
    time.sleep(0.05)
    assert httpx.get(base_url + "/health").status_code == 503
    refused = httpx.post(base_url + "/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    worker.join(timeout=10)
    assert not worker.is_alive() and events[-1] == "[DONE]"
    finishes = [
        c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]
    ]
    assert finishes == ["abort"]


@pytest.mark.parametrize(("drain", "signals"), [("60", 2)])  # ("0.5", 1) too, as the in-process drain test
def test_sigterm_drains_then_aborts_and_exits_cleanly(tiny_checkpoint, drain, signals):
    """A real SIGTERM: 503 at once; a second one during a 60 s drain aborts the stream and exits at once
    (a single one with a 0.5 s drain ends the same way). Either way: [DONE], exit status 0, no traceback."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nvfp4kit", "serve", str(tiny_checkpoint), "--port", str(port)]
    command += ["--dtype", "float32", "--max-model-len", "4096", "--graceful-timeout", drain]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        body = {
            "model": "tiny-gemma4",
            "prompt": "Go",
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            assert httpx.get(base_url + "/health").status_code == 503
            if signals == 2:
                process.send_signal(signal.SIGTERM)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        stopped = time.monotonic()
        assert events[-1] == "[DONE]"
        finishes = [
            c["finish_reason"] for e in events[1:-1] for c in json.loads(e)["choices"] if c["finish_reason"]
        ]
        assert finishes == ["abort"]
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 10
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert "Traceback" not in output, output
