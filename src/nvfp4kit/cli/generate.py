"""`nvfp4kit generate`: complete a prompt with a checkpoint (dense or NVFP4), on CPU or GPU."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Complete a prompt with a Gemma 4 checkpoint (BF16 or NVFP4) and print the text.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="prompt text (a <bos> is prepended)")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nvfp4kit.generate import LLM
    from nvfp4kit.sampling import SamplingParams

    llm = LLM(args.checkpoint, dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    ids = llm.encode(args.prompt)
    finish = "length"
    token_ids = []
    for event in llm.stream(ids, params):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        token_ids.append(event.token_id)
        finish = event.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[{len(token_ids)} tokens, finish_reason={finish}]", file=sys.stderr)
    if args.show_ids:
        print(token_ids)
    return 0
