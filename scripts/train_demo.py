"""Train nvfp4kit's built-in demo model: a ~13M-parameter Gemma 4 (MoE, K=V global layers) from scratch.

Steps (see docs/accuracy.md for the run that made the shipped model):

    python scripts/train_demo.py prepare            # CPU: corpus split, BPE tokenizer, tokenized code, held-out set
    python scripts/train_demo.py selfcheck          # CPU: the trainer's math equals nvfp4kit's model on its weights
    python scripts/train_demo.py train --out DIR    # GPU: about 10 minutes on one H100
    python scripts/train_demo.py install --from DIR # copy the trained files into src/nvfp4kit/assets/demo/

Data is what every machine has or what the scripts generate: the standard library of the Python that runs
`prepare` (held-out files never enter training), `help()`'s topic texts, and synthetic conversations in
Gemma 4's chat format (demo_chats.py). One seed fixes the tokenizer, the data order and the initial weights.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import demo_corpus  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nvfp4kit.config import FULL, SLIDING, config_from_dict  # noqa: E402
from nvfp4kit.testing.tiny import SPECIAL_TOKENS  # noqa: E402

DEMO_DIR = REPO / "src" / "nvfp4kit" / "assets" / "demo"
HELDOUT_FILE = REPO / "src" / "nvfp4kit" / "eval" / "data" / "heldout.jsonl"
DATA_DIR = REPO / ".demo_data"
RESERVED_IDS = 108  # Gemma 4's control tokens live below this id
VOCAB = 8192
PART_BYTES = 15 * 2**20  # files that come back from the GPU machine must stay under 16 MiB

DEMO_CONFIG = {
    "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text",
    "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "global_head_dim": 128, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
    "layer_types": [SLIDING] * 5 + [FULL], "sliding_window": 256,
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 192,
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "tie_word_embeddings": True, "attention_bias": False,
    "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": VOCAB, "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": [1, 106],
    "torch_dtype": "bfloat16",
}  # fmt: skip
GENERATION_CONFIG = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50], "do_sample": True,
                     "temperature": 1.0, "top_p": 0.95, "top_k": 64}  # fmt: skip


# ---- prepare (CPU) ---------------------------------------------------------------------------------


def reserved_tokens() -> list[str]:
    return [SPECIAL_TOKENS.get(i, f"<unused{i}>") for i in range(RESERVED_IDS)]


def train_tokenizer(texts: list[str], folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=reserved_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    for token_id, text in SPECIAL_TOKENS.items():
        if tok.token_to_id(text) != token_id:
            raise RuntimeError(f"{text} got id {tok.token_to_id(text)}, expected {token_id}")
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB}")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": DEMO_CONFIG["max_position_embeddings"]}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(REPO / "src" / "nvfp4kit" / "assets" / "chat_template.jinja", folder / "chat_template.jinja")


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size) if len(text[i : i + size]) >= size // 2]


def write_heldout(heldout_code, heldout_topics, facts, words, *, seed: int) -> None:
    """Held-out evaluation text: unseen stdlib files, unseen help() topics, chats from a separate stream."""
    from demo_chats import ChatFactory

    rng = random.Random(seed + 7)
    records = []
    code = [(f.name, c) for f in heldout_code for c in _chunks(f.text, 2400)]
    for name, text in rng.sample(code, min(32, len(code))):
        records.append({"source": f"stdlib:{name}", "text": text})
    docs = [(name, c) for name, t in heldout_topics.items() for c in _chunks(t, 2400)]
    for name, text in rng.sample(docs, min(12, len(docs))):
        records.append({"source": f"pydoc-topic:{name}", "text": text})
    factory = ChatFactory(random.Random(seed + 1_000_000_007), facts, words)
    for i in range(20):
        text = ""
        while len(text) < 2000:
            text += factory.document()
        records.append({"source": f"synthetic-chat:{i}", "text": text})
    HELDOUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    with HELDOUT_FILE.open("w") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(
        f"held-out set: {len(records)} records, {HELDOUT_FILE.stat().st_size / 1e3:.0f} kB -> {HELDOUT_FILE}"
    )


def prepare(args: argparse.Namespace) -> None:
    from demo_chats import ChatFactory
    from tokenizers import Tokenizer

    files = demo_corpus.read_stdlib()
    train_code, heldout_code = demo_corpus.split_files(files)
    topics = demo_corpus.pydoc_topics()
    train_topics = {k: v for k, v in topics.items() if not demo_corpus.is_heldout("topic:" + k)}
    heldout_topics = {k: v for k, v in topics.items() if demo_corpus.is_heldout("topic:" + k)}
    facts, heldout_facts = demo_corpus.doc_facts(train_code), demo_corpus.doc_facts(heldout_code)
    words = demo_corpus.common_words(list(train_topics.values()))
    print(f"stdlib: {len(train_code)} train files, {len(heldout_code)} held out; {len(facts)} doc facts")

    factory = ChatFactory(random.Random(args.seed), facts, words)
    chats = [factory.document() for _ in range(20_000)]
    texts = [f.text for f in train_code] + list(train_topics.values()) + chats
    t0 = time.time()
    train_tokenizer(texts, DEMO_DIR)
    print(f"tokenizer: {VOCAB} tokens in {time.time() - t0:.0f}s -> {DEMO_DIR / 'tokenizer.json'}")

    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    docs = ["<bos>" + f.text for f in train_code] + ["<bos>" + t for t in train_topics.values()]
    ids = np.concatenate(
        [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(docs, add_special_tokens=False)]
    )
    DATA_DIR.mkdir(exist_ok=True)
    np.savez_compressed(DATA_DIR / "code_tokens.npz", ids=ids)
    sources = {"train_facts": [f.__dict__ for f in facts], "words": words,
               "python": sys.version.split()[0], "seed": args.seed}  # fmt: skip
    (DATA_DIR / "chat_sources.json").write_text(json.dumps(sources))
    chat_tokens = sum(len(e.ids) for e in tok.encode_batch(chats[:2000], add_special_tokens=False)) / 2000
    print(f"code: {len(ids) / 1e6:.1f}M tokens; chats: {chat_tokens:.0f} tokens per document on average")
    write_heldout(heldout_code, heldout_topics, heldout_facts or facts, words, seed=args.seed)


# ---- selfcheck (CPU) -------------------------------------------------------------------------------


def write_checkpoint(tensors: dict[str, torch.Tensor], folder: Path, *, split: bool) -> list[Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    if not split:
        return [path]
    data, parts = path.read_bytes(), []
    for i in range(0, len(data), PART_BYTES):
        part = folder / f"model.safetensors.part{i // PART_BYTES}"
        part.write_bytes(data[i : i + PART_BYTES])
        parts.append(part)
    path.unlink()
    return parts


def selfcheck(args: argparse.Namespace) -> None:
    import tempfile

    from demo_model import DemoGemma4

    from nvfp4kit.model.contiguous_cache import ContiguousKVCache
    from nvfp4kit.model.loader import load_model

    cfg = config_from_dict(DEMO_CONFIG)
    torch.manual_seed(args.seed)
    model = DemoGemma4(cfg).eval()
    with torch.no_grad():  # random norm weights and a sharp router, so every path is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("scale", "per_expert_scale")):
                p.mul_(1 + 0.2 * torch.randn_like(p))
            if name.endswith("router.proj.weight"):
                p.mul_(30)
    ids = torch.randint(RESERVED_IDS, VOCAB, (1, 3 * cfg.sliding_window // 2))
    with torch.no_grad():
        ref, _ = model(ids)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(model.checkpoint_tensors(torch.float32), Path(tmp), split=False)
        ours = load_model(tmp, dtype=torch.float32)
        with torch.no_grad():
            got = ours(ids[0], ContiguousKVCache(ours.config).step(ids.shape[1]))
    err = (got - ref[0]).abs().max().item()
    print(f"max |logit difference| trainer vs nvfp4kit: {err:.2e} (logit scale {ref.abs().max().item():.1f})")
    if err > 1e-3:
        raise SystemExit("the trainer's model does not match nvfp4kit's")


# ---- train (GPU) -----------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    from demo_model import DemoGemma4, count_parameters, lr_at
    from demo_stream import BatchMaker, ChatStream

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = config_from_dict(DEMO_CONFIG)
    model = DemoGemma4(cfg).to(device)
    print(f"parameters: {count_parameters(model) / 1e6:.2f}M on {device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )  # fmt: skip
    code = np.load(DATA_DIR / "code_tokens.npz")["ids"]
    chats = ChatStream(DATA_DIR, DEMO_DIR / "tokenizer.json", seed=args.seed, workers=args.workers)
    batches = BatchMaker(code, chats, seq_len=args.seq_len, code_share=args.code_share, seed=args.seed)
    step_fn = torch.compile(model) if args.compile else model
    log, start, tokens = [], time.time(), 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total=args.steps, peak=args.lr, warmup=args.warmup)
        batch = batches.batch(args.batch).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, balance = step_fn(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        (loss + args.balance * balance).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch[:, 1:].numel()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            entry = {"step": step, "loss": round(loss.item(), 4), "balance": round(balance.item(), 4),
                     "grad_norm": round(norm.item(), 3), "lr": opt.param_groups[0]["lr"],
                     "tokens": tokens, "seconds": round(elapsed, 1)}  # fmt: skip
            log.append(entry)
            print(json.dumps(entry), f"{tokens / max(elapsed, 1e-9) / 1e3:.0f}k tok/s", flush=True)
        if time.time() - start > args.max_minutes * 60:
            print(f"stopping at step {step}: time limit", flush=True)
            break
    chats.close()
    out = Path(args.out)
    parts = write_checkpoint(model.checkpoint_tensors(torch.bfloat16), out, split=True)
    info = {"seed": args.seed, "steps": step + 1, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "code_share": args.code_share, "tokens": tokens, "seconds": round(time.time() - start, 1),
            "parameters": count_parameters(model), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "log": log}  # fmt: skip
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {[p.name for p in parts]} to {out}", flush=True)


# ---- install ---------------------------------------------------------------------------------------


def install(args: argparse.Namespace) -> None:
    """Join the model parts that came back from the GPU machine and place the checkpoint in the package."""
    src = Path(args.source)
    parts = sorted(src.glob("model.safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"no model.safetensors.part* in {src}")
    with (DEMO_DIR / "model.safetensors").open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    for name in ("config.json", "generation_config.json", "training.json"):
        shutil.copy(src / name, DEMO_DIR / name)
    print(f"installed the demo model in {DEMO_DIR}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").set_defaults(func=prepare)
    sub.add_parser("selfcheck").set_defaults(func=selfcheck)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=12_000)
    t.add_argument("--max-minutes", type=float, default=10.0)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=300)
    t.add_argument("--balance", type=float, default=0.01, help="weight of the MoE load-balancing loss")
    t.add_argument("--code-share", type=float, default=0.35, help="share of rows that are stdlib code/docs")
    t.add_argument("--workers", type=int, default=12, help="processes generating chats")
    t.add_argument("--device", default="cuda")
    t.add_argument("--compile", action="store_true")
    t.set_defaults(func=train)
    i = sub.add_parser("install")
    i.add_argument("--from", dest="source", required=True)
    i.set_defaults(func=install)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
