"""`nvfp4kit generate`: complete a prompt, or answer a chat message, with a checkpoint (BF16 or NVFP4).

`--image PATH` (repeatable) asks about images: the message goes through `LLM.chat` as content parts (the
images first, then the text), as a Python caller or the server would send it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nvfp4kit.cli.engine_options import add_engine_arguments, llm_arguments


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Complete a prompt (or, with --chat, answer it as a user message through the checkpoint's "
        "chat template) with a Gemma 4 checkpoint, BF16 or NVFP4, on CPU or GPU."
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (default: the built-in NVFP4 demo model)")
    p.add_argument("--prompt", required=True, help="prompt text (a <bos> is prepended), or the user message")
    p.add_argument(
        "--chat", action="store_true", help="render --prompt as a user turn with the chat template"
    )
    p.add_argument(
        "--think", action="store_true", help="with --chat: enable thinking (<|think|> in the system turn)"
    )
    p.add_argument("--system", help="with --chat: a system message")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH",
        help="an image file (PNG, JPEG, WebP, ...) shown before the message; repeat for several; implies --chat "
        "and needs a checkpoint with a vision tower",
    )  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy; default: the checkpoint's generation_config",
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: generation_config)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: generation_config)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--show-ids", action="store_true", help="also print the generated token ids")
    add_engine_arguments(p, max_num_seqs=1)
    p.set_defaults(func=run)


def chat_prompt(folder, message: str, *, think: bool, system: str | None) -> str:
    from nvfp4kit.prompting.chat_template import load_chat_template

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    return load_chat_template(folder).render(messages, template_kwargs={"enable_thinking": think})


def run(args: argparse.Namespace) -> int:
    from nvfp4kit.demo import demo_model_path
    from nvfp4kit.llm import LLM
    from nvfp4kit.sampling import SamplingParams

    folder = args.checkpoint or demo_model_path("nvfp4")
    if args.image:
        check_images(folder, args.image, language_model_only=args.language_model_only)
    llm = LLM(folder, dtype=args.dtype, device=args.device, **llm_arguments(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.image:
        return answer_with_images(llm, args, params)
    prompt = (
        chat_prompt(folder, args.prompt, think=args.think, system=args.system) if args.chat else args.prompt
    )
    finish, token_ids, text = "length", [], ""
    for event in llm.stream(llm.encode(prompt), params):
        if not args.chat:  # raw completions stream as they come; chats are shown parsed at the end
            sys.stdout.write(event.text)
            sys.stdout.flush()
        text += event.text
        token_ids.append(event.token_id)
        finish = event.finish_reason or finish
    if args.chat:
        print_chat_reply(text, prompt)
    return finish_output(token_ids, finish, show_ids=args.show_ids)


def print_chat_reply(text: str, prompt: str) -> None:
    from nvfp4kit.serve.reasoning import prompt_opens_reasoning, split_reasoning

    reasoning, content = split_reasoning(text, starts_in_reasoning=prompt_opens_reasoning(prompt))
    if reasoning:
        print(f"[thinking] {reasoning.strip()}")
    sys.stdout.write(content.strip())


def finish_output(token_ids: list[int], finish: str | None, *, show_ids: bool) -> int:
    sys.stdout.write("\n")
    print(f"[{len(token_ids)} tokens, finish_reason={finish}]", file=sys.stderr)
    if show_ids:
        print(token_ids)
    return 0


def check_images(folder, paths: list[str], *, language_model_only: bool) -> None:
    """Refuse, before any weight loads, a missing or undecodable image file and a model that takes no images."""
    from nvfp4kit.vision.config import load_multimodal_config
    from nvfp4kit.vision.preprocess import ImageError, open_image

    if language_model_only:
        raise ValueError("--image and --language-model-only exclude each other: the vision tower is off")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
        try:
            open_image(path)
        except ImageError as exc:
            raise ValueError(f"--image {path}: {exc}") from None
    if load_multimodal_config(folder) is None:
        raise ValueError(
            f"{folder} is a text-only checkpoint (no vision_config in config.json): it cannot take --image"
        )


def image_messages(prompt: str, images: list[str], system: str | None) -> list[dict]:
    """One user turn: the images (as `{"type": "image", "image": path}` parts), then the text."""
    parts = [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": prompt}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": parts}]


def answer_with_images(llm, args: argparse.Namespace, params) -> int:
    """The message and images through `LLM.chat` (not streamed: the images are encoded with the prompt)."""
    messages = image_messages(args.prompt, args.image, args.system)
    out = llm.chat(messages, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": args.think})[0]
    print_chat_reply(out.text, out.prompt)
    return finish_output(out.token_ids, out.finish_reason, show_ids=args.show_ids)
