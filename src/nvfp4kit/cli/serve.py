"""`nvfp4kit serve`: an OpenAI-compatible HTTP server for a Gemma 4 checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path

from nvfp4kit.cli.engine_options import add_engine_arguments, llm_arguments

MODEL_HELP = """\
nvfp4kit serve takes a model folder: nvfp4kit serve PATH
PATH holds config.json, the *.safetensors weights, tokenizer.json and (ideally) chat_template.jinja,
for example a Gemma 4 checkpoint quantized with `nvfp4kit quantize`. Without PATH it serves the built-in
NVFP4 demo model."""
DEMO_NAME = "nvfp4kit-demo"


def resolve_model(model: str | None) -> tuple[Path, str]:
    """The folder to serve and its default served name; no MODEL means the built-in NVFP4 demo model."""
    if model:
        folder = Path(model)
        return folder, folder.resolve().name
    from nvfp4kit.demo import demo_model_path

    return demo_model_path("nvfp4"), DEMO_NAME


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve a Gemma 4 checkpoint with /v1/chat/completions, /v1/completions, /v1/models, "
        "/health and /metrics (thinking and tool calls parsed from Gemma 4's own format)."
    )
    p.add_argument(
        "model",
        nargs="?",
        help="checkpoint folder (config.json, *.safetensors, tokenizer.json); default: the built-in NVFP4 demo model",
    )
    p.add_argument(
        "--random-weights",
        metavar="SHAPE",
        help="serve random NVFP4 weights of a preset's shape instead of a checkpoint (gemma-4-26b-a4b or "
        "26b-a4b, any `nvfp4kit plan` preset, tiny-moe): real speeds, nonsense text, no download",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port to listen on (default 30000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("NVFP4KIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $NVFP4KIT_API_KEY, or no key)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients send; the first is listed first (default: the folder's name)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM/SIGINT (default 30)",
    )
    p.add_argument(
        "--max-body-size", type=_size_arg, default=None, metavar="SIZE",
        help="largest request body accepted, e.g. 32MiB (default); larger bodies get 413",
    )  # fmt: skip
    p.add_argument(
        "--public-metrics", action="store_true", help="serve /metrics without the API key (for a scraper)"
    )
    add_engine_arguments(p)
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="prefill every prompt whole (by default a request reuses the KV of a beginning computed before)",
    )
    p.add_argument(
        "--warm-history",
        action="store_true",
        help="after a chat reply (from a conversation's second turn on), prefill the history with it as a "
        "background request that yields to the clients' requests, so that the next turn finds the reply's KV "
        "cached (off by default; nvfp4kit.serve.history_warmup)",
    )
    p.set_defaults(func=run)


def _size_arg(text: str) -> int:
    from nvfp4kit.plan.units import parse_size

    try:
        return parse_size(text, option="--max-body-size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--max-body-size: ")) from None


def run(args: argparse.Namespace) -> int:
    random_weights = getattr(args, "random_weights", None)
    if args.api_key is not None and not args.api_key.strip():  # refused before minutes of loading, not after
        raise ValueError("--api-key (or $NVFP4KIT_API_KEY) is empty; give a key or leave it unset")
    if random_weights and args.model:
        raise ValueError("give a model folder or --random-weights SHAPE, not both")
    folder, default_name = resolve_model(args.model)
    if not random_weights and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json there)\n{MODEL_HELP}")

    import uvicorn

    from nvfp4kit.llm import LLM
    from nvfp4kit.prompting.chat_template import load_chat_template
    from nvfp4kit.serve.app import create_app
    from nvfp4kit.serve.engine_protocol import engine_for

    log = logging.getLogger("nvfp4kit.serve")
    engine_args = llm_arguments(args)
    if not getattr(args, "prefix_caching", True):
        engine_args["engine_config"] = replace(engine_args["engine_config"], prefix_caching=False)
    if random_weights:  # the shape's speed without a download (nvfp4kit.testing.random_llm)
        from nvfp4kit.testing.random_llm import RandomLLM

        engine_args.pop("language_model_only", None)  # random weights are text only anyway
        llm = RandomLLM(random_weights, dtype=args.dtype, device=args.device, **engine_args)
        folder, default_name = llm.path, f"{llm.shape}-random"
    else:
        llm = LLM(folder, dtype=args.dtype, device=args.device, **engine_args)
    template = load_chat_template(folder)
    names = args.served_model_name or [default_name]
    limits = {"max_body_bytes": args.max_body_size} if args.max_body_size else {}
    app = create_app(
        engine_for(llm), template=template, model_names=names, api_key=args.api_key,
        drain_timeout=args.graceful_timeout, public_metrics=args.public_metrics,
        warm_history=args.warm_history and engine_args["engine_config"].prefix_caching, **limits,
    )  # fmt: skip
    log.info(
        "serving %s as %s on http://%s:%d (chat template: %s)",
        folder,
        names,
        args.host,
        args.port,
        template.origin,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    # uvicorn drains running requests on SIGTERM/SIGINT and then re-raises the signal; with this handler in
    # place that re-raise is a no-op, so a graceful stop exits with status 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    log.info("server stopped")
    return 0
