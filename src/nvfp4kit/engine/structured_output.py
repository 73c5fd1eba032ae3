"""Constrained decoding (JSON schema, JSON object, regex, Lark grammars, choices) with llguidance.

`compile_constraint(tokenizer, kind, spec)` builds a grammar and its token matcher once (off the engine
thread: the server calls it in its prepare workers; compiled grammars are cached); each request gets a cheap
copy (`Constraint.start()`). Before sampling, the engine masks every token the grammar forbids at this point
(`ConstraintState.mask`); after sampling the token is fed to the matcher. With `start_after` (Gemma 4's
`<channel|>` when the prompt opens a thought), nothing is constrained until that token has been generated:
the thinking stays free, the answer after it follows the grammar.

llguidance is optional (`pip install llguidance`); without it a constraint raises `ConstraintError`.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from nvfp4kit.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
_lock = threading.Lock()


class ConstraintError(ValueError):
    """The constraint cannot be compiled (bad schema, regex or grammar, or llguidance missing)."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise ConstraintError(
            "structured output needs llguidance: pip install llguidance (the nvfp4kit 'structured' extra)"
        ) from exc
    return llguidance


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: Tokenizer, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of our tokenizer (about a second to build, so once per tokenizer)."""
    llguidance = _llguidance()
    return llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=list(eos_ids))


def grammar_for(kind: str, spec: Any) -> str:
    """llguidance grammar text for a constraint of `kind` (one of KINDS)."""
    matcher = _llguidance().LLMatcher
    compact = {"whitespace_flexible": False}  # no free whitespace: a small model could pad forever
    if kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=compact)
    if kind == "json_schema":
        if not isinstance(spec, (dict, bool)):
            raise ConstraintError("the JSON schema must be an object")
        return matcher.grammar_from_json_schema(json.dumps(spec), defaults=compact)
    if kind == "regex":
        return matcher.grammar_from_regex(str(spec))
    if kind == "grammar":  # Lark, or GBNF/EBNF (`root ::= ...`, as llama.cpp and xgrammar write it)
        from llguidance.gbnf_to_lark import any_to_lark

        return matcher.grammar_from_lark(any_to_lark(str(spec)))
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise ConstraintError("choice must be a non-empty list of strings")
        alternatives = " | ".join(json.dumps(c) for c in spec)
        return matcher.grammar_from_lark(f"start: {alternatives}")
    raise ConstraintError(f"unknown constraint kind {kind!r}; use one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar; `start()` gives the per-request state. Equal constraints share one compilation."""

    kind: str
    spec_key: str
    prototype: Any = field(compare=False, repr=False)
    start_after: int | None = None

    def start(self, vocab_size: int) -> ConstraintState:
        waiting = self.start_after is not None
        return ConstraintState(
            self.prototype.deep_copy(), vocab_size, waiting=waiting, start_after=self.start_after
        )

    def after(self, token_id: int | None) -> Constraint:
        """The same grammar, applied only once `token_id` has been generated (None: from the first token)."""
        return Constraint(self.kind, self.spec_key, self.prototype, token_id)


def compile_constraint(tokenizer: Tokenizer, kind: str, spec: Any, *, eos_ids: tuple[int, ...]) -> Constraint:
    """Compile (or take from the cache) the constraint; raises ConstraintError with llguidance's message."""
    key = json.dumps(spec) if not isinstance(spec, str) else spec  # keeps the order of the properties
    return _compiled(tokenizer, kind, key, tuple(eos_ids))


@functools.lru_cache(maxsize=256)
def _compiled(tokenizer: Tokenizer, kind: str, key: str, eos_ids: tuple[int, ...]) -> Constraint:
    spec = key if kind in ("regex", "grammar") else json.loads(key)
    grammar = grammar_for(kind, spec)
    llguidance = _llguidance()
    with _lock:
        ll_tokenizer = _ll_tokenizer(tokenizer, eos_ids)
    problem = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer)
    if problem and not problem.startswith("WARNING"):
        raise ConstraintError(f"the {kind.replace('_', ' ')} cannot be compiled: {problem}")
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"the {kind.replace('_', ' ')} cannot be compiled: {matcher.get_error()}")
    return Constraint(kind, key, matcher)


@dataclass
class ConstraintState:
    """One request's position in its grammar."""

    matcher: Any
    vocab_size: int  # the tokenizer's; logits columns beyond it are masked too
    waiting: bool  # True until `start_after` is generated
    start_after: int | None = None

    @property
    def active(self) -> bool:
        return not self.waiting and not self.matcher.is_error()

    def accept(self, token_id: int) -> None:
        if self.waiting:
            self.waiting = token_id != self.start_after
            return
        self.matcher.consume_token(token_id)


@functools.lru_cache(maxsize=1)
def _executor() -> Any:
    """llguidance's thread pool: the masks of a batch are computed in parallel in Rust, without the GIL."""
    return _llguidance().LLExecutor()


@functools.lru_cache(maxsize=4)
def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: the bits of every byte value, lowest first."""
    values = torch.arange(256, dtype=torch.int32)
    return ((values[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(device)


def apply_constraint_masks(logits: torch.Tensor, rows: list[tuple[int, ConstraintState]]) -> None:
    """Set every token its grammar forbids to -inf in logits[row] (in place), for all constrained rows at once:
    one bitmask [rows, vocab / 32] filled in parallel, one transfer of it (4 bytes per 32 tokens), one unpack
    and one masked fill on the logits' device."""
    rows = [(i, state) for i, state in rows if state.active]
    if not rows:
        return
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

    vocab = rows[0][1].vocab_size
    bitmask = allocate_token_bitmask(len(rows), vocab)  # bit j of word w: token 32 w + j is allowed
    fill_next_token_bitmask_par(
        _executor(), [(state.matcher, k) for k, (_, state) in enumerate(rows)], bitmask
    )
    words = bitmask.to(logits.device, non_blocking=True)
    # each byte of the (little-endian) words -> its 8 bits through a 256-entry table: 1.7x faster than shifts
    allowed = _byte_bits(logits.device)[words.view(torch.uint8).long()].flatten(1)[:, :vocab]
    index = torch.tensor([i for i, _ in rows], device=logits.device)
    picked = logits[index]
    picked[:, :vocab] = picked[:, :vocab].masked_fill(~allowed, float("-inf"))
    picked[:, vocab:] = float("-inf")  # padding columns of the head
    logits[index] = picked
