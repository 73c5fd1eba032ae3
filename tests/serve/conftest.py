"""Fixtures for the server tests: a tiny checkpoint, the real `nvfp4kit serve` process on a free port,
and an in-process server around a scripted engine (a stand-in model whose replies the test chooses,
so tool calls and reasoning arrive exactly as a real Gemma 4 would write them)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from nvfp4kit.sampling import SamplingParams
from nvfp4kit.serve.engine_protocol import EngineStats
from nvfp4kit.testing.tiny import write_tiny_checkpoint
from nvfp4kit.tokenizer import IncrementalDetokenizer, Tokenizer

API_KEY = "test-key"
MAX_MODEL_LEN = 512
TURN_END, TOOL_RESPONSE = 106, 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, process: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {base_url} did not become healthy in {timeout} s")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma4", shape="moe")


def start_server(checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "nvfp4kit", "serve", str(checkpoint), "--port", str(port), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base_url = f"http://127.0.0.1:{port}"
    wait_healthy(base_url, process)
    return process, base_url


def stop_server(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture(scope="session")  # one process for every module: each start costs ~8 s on 2 cores
def server(tiny_checkpoint) -> str:
    """Base URL of `nvfp4kit serve` on the tiny checkpoint, with an API key, a 512-token context and the chat
    history warm-up on (its requests then run beside every test's)."""
    process, base_url = start_server(
        tiny_checkpoint,
        "--api-key",
        API_KEY,
        "--served-model-name",
        "tiny",
        "tiny-alias",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--dtype",
        "float32",
        "--warm-history",
    )
    yield base_url
    stop_server(process)


@dataclass
class ScriptedToken:
    """What the server reads from an engine's token event."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None
    prompt_logprobs: list | None = None


class ScriptedEngine:
    """An AsyncEngine whose reply to a prompt is `reply(prompt_text)`, tokenized with the tiny tokenizer.

    The reply ends with `<turn|>`, or with `<|tool_response>` when it contains a tool call (as Gemma 4
    stops), unless max_tokens cuts it first. Every prompt it was asked for is kept in `prompts`, and whether
    it came as a background request (the server's history warm-up) in `background`.
    """

    def __init__(self, checkpoint: Path, reply: Callable[[str], str]) -> None:
        self.tokenizer = Tokenizer(checkpoint)
        self.max_model_len = MAX_MODEL_LEN
        self.stop_token_ids = frozenset({1, TURN_END, TOOL_RESPONSE})
        self.reply = reply
        self.prompts: list[str] = []
        self.prompt_ids: list[list[int]] = []
        self.background: list[bool] = []
        self.token_delay = 0.0  # seconds between tokens (to keep streams open in shutdown tests)
        self._running = 0
        self._aborted = False

    def stats(self) -> EngineStats:
        return EngineStats(self._running, 0)

    async def close(self) -> None:
        return None

    def abort_all(self) -> None:
        self._aborted = True

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, *, background: bool = False
    ) -> AsyncIterator[ScriptedToken]:
        prompt = self.tokenizer.decode(prompt_ids)
        self.prompts.append(prompt)
        self.prompt_ids.append(list(prompt_ids))
        self.background.append(background)
        text = self.reply(prompt)
        ids = self.tokenizer.encode(text, add_bos=False)
        ids.append(TOOL_RESPONSE if "<|tool_call>" in text else TURN_END)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        self._running += 1
        try:
            for step, token in enumerate(ids[: params.max_tokens]):
                await asyncio.sleep(self.token_delay)
                if self._aborted:
                    yield ScriptedToken(-1, "", float("nan"), [], "abort")
                    return
                if token in self.stop_token_ids:
                    yield ScriptedToken(token, "", -0.5, [], "stop")
                    return
                delta = detok.push(token)
                last = step == params.max_tokens - 1
                yield ScriptedToken(
                    token, delta, -0.5, [(token, -0.5)][: params.logprobs or 0], "length" if last else None
                )
        finally:
            self._running -= 1


@pytest.fixture
def scripted_server(tiny_checkpoint):
    """Start an in-process server around a ScriptedEngine: `scripted_server(reply)` -> (base_url, engine)."""
    import uvicorn

    from nvfp4kit.prompting.chat_template import load_chat_template
    from nvfp4kit.serve.app import create_app

    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(reply: Callable[[str], str], **app_options) -> tuple[str, ScriptedEngine]:
        engine = ScriptedEngine(tiny_checkpoint, reply)
        app = create_app(
            engine, template=load_chat_template(tiny_checkpoint), model_names=["scripted"], **app_options
        )
        engine.app = app
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        return base_url, engine

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)
