"""NVFP4 recipes and calibrations on the demo model against its BF16 original, measured in one run.

    python scripts/demo_accuracy.py --out docs/results/accuracy.json [--device cpu]
    python scripts/demo_accuracy.py --only all-nvfp4-gptq-round     # one export's row, printed only
    python scripts/demo_accuracy.py --only all-nvfp4-gptq --calib-samples 256 --calib-records 320
    python scripts/demo_accuracy.py --only all-nvfp4-gptq-guided --set calib_guided.GROUP_ROWS=64
    python scripts/demo_accuracy.py --only all-nvfp4-gptq-guided --refine-kwargs '{"block_scales": true}'
    python scripts/demo_accuracy.py --only all-nvfp4-gptq-guided --log-layers \
        --refine-kwargs '{"learned_rounding": true, "layer_fisher": true}'
    python scripts/demo_accuracy.py --only all-nvfp4-gptq-guided --cache /tmp/exports --distill '{"steps": 200}'

Makes each export with `nvfp4kit.quant.quantize` (max calibration: the seed's all-NVFP4 recipe and NVIDIA's
attention-in-BF16 one) and `nvfp4kit.quant.calib_refine.refine_checkpoint` (better scales and rounding,
same format), then compares every export with the BF16 model on the held-out slice shipped with nvfp4kit
(the reference logits are computed once). Calibration text for the data-driven methods: either the built-in
corpus, or text from the demo model's own training distribution (standard-library files of the training split
and synthetic chats from their own seed; never the held-out slice). `--distill`: each export is then also
distilled against the BF16 model on the same calibration text (calib_distill) and scored as a second row;
`--cache DIR` keeps the exports there and reuses one already made (same name: same settings is the caller's
promise).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import demo_corpus  # noqa: E402
import torch  # noqa: E402
from demo_chats import ChatFactory  # noqa: E402

from nvfp4kit import SamplingParams  # noqa: E402
from nvfp4kit.demo import demo_model_path  # noqa: E402
from nvfp4kit.eval import ReferenceLogits, checkpoint_bytes, load_samples  # noqa: E402
from nvfp4kit.llm import LLM  # noqa: E402
from nvfp4kit.model.loader import load_model  # noqa: E402
from nvfp4kit.prompting.chat_template import load_chat_template  # noqa: E402
from nvfp4kit.quant import calib_refine, quantize  # noqa: E402
from nvfp4kit.quant.calib_distill import distill_checkpoint  # noqa: E402
from nvfp4kit.quant.calib_refine import refine_checkpoint  # noqa: E402
from nvfp4kit.tokenizer import Tokenizer  # noqa: E402

CALIB_SEED = 20_260_601  # far from the training stream's chunk seeds and from the held-out chats' seed


def write_domain_calibration(path: Path, *, records: int = 160) -> Path:
    """Standard-library code and help() topics of the training split, and packed synthetic chats (about
    2.4k characters a record, 2 : 1 : 2), the mix the demo model was trained on."""
    rng = random.Random(CALIB_SEED)
    train_code, _ = demo_corpus.split_files(demo_corpus.read_stdlib())
    topics = [t for k, t in demo_corpus.pydoc_topics().items() if not demo_corpus.is_heldout("topic:" + k)]
    factory = ChatFactory(
        random.Random(CALIB_SEED + 1), demo_corpus.doc_facts(train_code), demo_corpus.common_words(topics)
    )
    texts = []
    for source in rng.sample(train_code, 2 * records // 5) + [None] * (records // 5):
        text = source.text if source is not None else rng.choice(topics)
        start = rng.randrange(max(1, len(text) - 2400))
        texts.append(text[start : start + 2400])
    while len(texts) < records:
        chat = ""
        while len(chat) < 2000:
            chat += factory.document()
        texts.append(chat)
    rng.shuffle(texts)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


EXPORTS = (  # (name, recipe, calibration, calibration data: None = none needed, "builtin" or "domain")
    ("all-nvfp4-max", "all-nvfp4", "max", None),
    ("attention-bf16-max", "attention-bf16", "max", None),
    ("all-nvfp4-mse", "all-nvfp4", "mse", None),
    ("all-nvfp4-mse-output", "all-nvfp4", "mse-output", "domain"),
    ("all-nvfp4-gptq-builtin", "all-nvfp4", "gptq", "builtin"),
    ("all-nvfp4-gptq", "all-nvfp4", "gptq", "domain"),
    ("all-nvfp4-gptq-guided", "all-nvfp4", "gptq-guided", "domain"),
    ("all-nvfp4-gptq-round", "all-nvfp4", "gptq-round", "domain"),
)

PROMPTS = (  # (label, messages, thinking, tools)
    ("chat", [{"role": "user", "content": "Hi"}], False, None),
    ("chat", [{"role": "user", "content": "What is NVFP4?"}], False, None),
    ("chat", [{"role": "user", "content": "How do I call shutil.rmtree?"}], False, None),
    ("chat", [{"role": "user", "content": "What is 47 + 38?"}], False, None),
    ("thinking", [{"role": "user", "content": "What is 47 + 38?"}], True, None),
    (
        "thinking",
        [{"role": "user", "content": "Sort these numbers from smallest to largest: 42, 7, 19, 3."}],
        True,
        None,
    ),  # fmt: skip
    ("tool call", [{"role": "user", "content": "What's the weather in Paris?"}], True, "weather"),
    (
        "tool result",
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": {"temperature": 18, "condition": "sunny"}},
        ],
        False,
        "weather",
    ),  # fmt: skip
)


def greedy_answers(folder: Path) -> list[dict]:
    from demo_chats import WEATHER_TOOL

    llm, template = LLM(folder), load_chat_template(folder)
    answers = []
    for label, messages, thinking, tools in PROMPTS:
        tool_list = [WEATHER_TOOL] if tools else None
        prompt = template.render(messages, tools=tool_list, template_kwargs={"enable_thinking": thinking})
        out = llm.generate(prompt, SamplingParams(max_tokens=160, temperature=0))[0]
        stop = llm.tokenizer.decode(out.token_ids[-1:]) if out.finish_reason == "stop" else ""
        answers.append({"kind": label, "thinking": thinking, "messages": messages, "prompt": prompt,
                        "output": out.text, "stop": stop})  # fmt: skip
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="default: docs/results/accuracy.json; with --only: print the rows only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument(
        "--calib-records",
        type=int,
        default=160,
        help="records of demo-domain text (about one 512-token window each)",
    )
    parser.add_argument("--only", nargs="+", help="export names to measure (default: all of EXPORTS)")
    parser.add_argument("--refine-kwargs", default="{}", help="JSON of extra refine_checkpoint arguments")
    parser.add_argument("--distill", help="JSON of distill_checkpoint arguments: also distil each export")
    parser.add_argument("--cache", help="keep the exports in this folder and reuse those already there")
    parser.add_argument(
        "--log-layers", action="store_true", help="print each layer's learned-rounding / block-scale report"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="MODULE.NAME=JSON", help="e.g. calib_guided.GROUP_ROWS=64"
    )
    args = parser.parse_args()
    for (
        item
    ) in args.set:  # settings of nvfp4kit.quant modules (calib_round.STEPS, calib_guided.GROUP_ROWS, ...)
        target, value = item.split("=", 1)
        module, name = target.rsplit(".", 1)
        setattr(importlib.import_module(f"nvfp4kit.quant.{module}"), name, json.loads(value))
    exports = [e for e in EXPORTS if not args.only or e[0] in args.only]
    if args.only and not exports:
        parser.error(f"--only takes names of {', '.join(e[0] for e in EXPORTS)}")
    if args.out is None and not args.only:
        args.out = str(REPO / "docs" / "results" / "accuracy.json")
    extra = json.loads(args.refine_kwargs)
    if args.log_layers:  # the kept-aside calibration error of every layer (what picked its checkpoint)
        calib_refine.ROUND_LOG, calib_refine.BLOCK_LOG = [], []
    started = time.time()
    bf16 = demo_model_path("bf16")
    samples = load_samples(None, Tokenizer(bf16), num_samples=args.num_samples, seq_len=args.seq_len)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nvfp4kit-accuracy-") as tmp:
        tmp = Path(tmp)
        data = {
            "builtin": [],
            "domain": [write_domain_calibration(tmp / "domain_calib.jsonl", records=args.calib_records)],
        }
        reference = ReferenceLogits(
            load_model(bf16, dtype=torch.float32, device=args.device), samples, folder=tmp
        )
        store = Path(args.cache) if args.cache else tmp
        store.mkdir(parents=True, exist_ok=True)
        for name, recipe, calibration, source in exports:
            t0 = time.time()
            base = store / f"{recipe}-max"
            if not base.exists():
                quantize(
                    bf16,
                    base,
                    recipe=recipe,
                    num_samples=args.calib_samples,
                    device=args.device,
                    progress=False,
                )
            folder = base
            if calibration != "max" and not (store / name).exists():
                folder = store / name
                refine_checkpoint(bf16, base, folder, method=calibration, calib_data=data[source or "builtin"],
                                  num_samples=args.calib_samples, device=args.device, progress=False,
                                  **extra)  # fmt: skip
            elif calibration != "max":
                folder = store / name
            candidates = [(folder, calibration)]
            if args.distill is not None:
                t1 = time.time()
                distilled = tmp / f"{name}-distill"
                report = distill_checkpoint(bf16, folder, distilled, calib_data=data[source or "builtin"],
                                            num_samples=args.calib_samples, device=args.device, log=True,
                                            **json.loads(args.distill))  # fmt: skip
                print(json.dumps({"distill": vars(report)}), f"({time.time() - t1:.0f}s)", flush=True)
                candidates.append((distilled, f"{calibration}+distill"))
            for scored, label in candidates:
                result = reference.score(load_model(scored, dtype=torch.float32, device=args.device))
                row = {"recipe": recipe, "calibration": label, "calibration_data": source or "none",
                       "kl_mean": result.kl_mean, "kl_p99": result.kl_p99, "top1_agreement": result.top1_agreement,
                       "ppl": result.ppl_quant, "ppl_bf16": result.ppl_ref, "model_bytes": checkpoint_bytes(scored)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), f"({time.time() - t0:.0f}s)", flush=True)
            if args.log_layers:
                print(
                    json.dumps({"round": calib_refine.ROUND_LOG, "block": calib_refine.BLOCK_LOG}), flush=True
                )
                calib_refine.ROUND_LOG, calib_refine.BLOCK_LOG = [], []
    if args.out is None:  # --only: a partial table is not the results file
        return
    bf16_row = {"recipe": "bf16", "calibration": "none", "calibration_data": "none", "kl_mean": 0.0, "kl_p99": 0.0,
                "top1_agreement": 1.0, "ppl": rows[0]["ppl_bf16"], "ppl_bf16": rows[0]["ppl_bf16"],
                "model_bytes": checkpoint_bytes(bf16)}  # fmt: skip
    result = {
        "model": "nvfp4kit demo (src/nvfp4kit/assets/demo)",
        "command": "python scripts/demo_accuracy.py --out docs/results/accuracy.json --device " + args.device,
        "data": "src/nvfp4kit/eval/data/heldout.jsonl", "num_samples": len(samples),
        "num_tokens": sum(len(s) - 1 for s in samples), "seq_len": args.seq_len,
        "calibration_samples": args.calib_samples, "device": args.device, "torch": torch.__version__,
        "seconds": round(time.time() - started, 1), "rows": [bf16_row, *rows],
        "greedy_answers_bf16": greedy_answers(bf16),
        "greedy_answers_nvfp4_max": greedy_answers(demo_model_path("nvfp4")),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
