"""The first run a user makes: `nvfp4kit serve` with no model serves the built-in NVFP4 demo, and it thinks."""

import os
import subprocess
import sys

from openai import OpenAI

from .conftest import free_port, stop_server, wait_healthy


def test_serve_with_no_model_answers_a_thinking_chat_with_the_demo():
    port = free_port()
    command = [sys.executable, "-m", "nvfp4kit", "serve", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, process)
        client = OpenAI(base_url=base_url + "/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["nvfp4kit-demo"]
        reply = client.chat.completions.create(
            model="nvfp4kit-demo",
            messages=[{"role": "user", "content": "What is 47 + 38?"}],
            temperature=0,
            max_tokens=96,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
        message = reply.choices[0].message
        assert message.reasoning_content and message.content
        assert "<|channel>" not in message.content and "<channel|>" not in message.content
        assert reply.choices[0].finish_reason == "stop"
    finally:
        assert stop_server(process) == 0
