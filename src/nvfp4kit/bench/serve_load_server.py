"""The server `nvfp4kit bench serve` starts for itself: `nvfp4kit serve` on a free loopback port, in a child
process whose output goes to a log file; ready when `/health` answers 200, stopped (SIGTERM, then kill) at
the end. Light at import time: httpx is imported when a server starts."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    model: str | None = None  # a checkpoint folder; None: the built-in demo
    random_weights: str | None = None  # a shape for `serve --random-weights`
    device: str = "cpu"
    extra: str = ""  # more `nvfp4kit serve` options, shell-quoted
    timeout_s: float = 1800.0
    api_key: str | None = None


@dataclass
class Server:
    base_url: str
    command: list[str]
    process: subprocess.Popen
    log_path: str


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(options: ServerOptions, port: int) -> list[str]:
    command = [sys.executable, "-m", "nvfp4kit", "serve"]
    if options.model:
        command.append(options.model)
    if options.random_weights:
        command += ["--random-weights", options.random_weights]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", options.device]
    if options.api_key:
        command += ["--api-key", options.api_key]
    return command + shlex.split(options.extra)


def _log_tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def wait_for_health(server: Server, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with status {server.process.returncode} before it was ready:\n"
                + _log_tail(server.log_path)
            )
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not healthy after {timeout_s:.0f} s:\n" + _log_tail(server.log_path))


def stop(process: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (the server drains running requests and exits 0), then kill after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextlib.contextmanager
def started_server(options: ServerOptions, *, log: Callable[[str], None] = print) -> Iterator[Server]:
    port = free_loopback_port()
    command = serve_command(options, port)
    log_file = tempfile.NamedTemporaryFile("w", prefix="nvfp4kit-bench-serve-", suffix=".log", delete=False)
    log(f"starting {shlex.join(command[1:])} (log: {log_file.name})")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ))
    log_file.close()
    server = Server(f"http://127.0.0.1:{port}", command, process, log_file.name)
    try:
        started = time.monotonic()
        wait_for_health(server, options.timeout_s)
        log(f"server ready in {time.monotonic() - started:.1f} s at {server.base_url}")
        yield server
    finally:
        status = stop(process)
        if status != 0:
            log(f"the server exited with status {status}; its log: {log_file.name}")
        else:
            os.unlink(log_file.name)
