"""`nvfp4kit generate`: complete a prompt, or answer a chat message, with a checkpoint (BF16 or NVFP4)."""

from __future__ import annotations

import argparse
import sys

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
    llm = LLM(folder, dtype=args.dtype, device=args.device, **llm_arguments(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
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
        from nvfp4kit.serve.reasoning import prompt_opens_reasoning, split_reasoning

        reasoning, content = split_reasoning(text, starts_in_reasoning=prompt_opens_reasoning(prompt))
        if reasoning:
            print(f"[thinking] {reasoning.strip()}")
        sys.stdout.write(content.strip())
    sys.stdout.write("\n")
    print(f"[{len(token_ids)} tokens, finish_reason={finish}]", file=sys.stderr)
    if args.show_ids:
        print(token_ids)
    return 0
