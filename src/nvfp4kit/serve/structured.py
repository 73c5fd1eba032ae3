"""Structured output for the server: the request's constraint compiled in the prepare worker (never on the
event loop or the engine thread), errors as 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

from nvfp4kit.engine.structured_output import Constraint, ConstraintError, compile_constraint
from nvfp4kit.serve.errors import APIError
from nvfp4kit.serve.tool_grammar import tool_call_grammar


def request_constraint(engine: Any, request: Any, *, start_after: int | None = None) -> Constraint | None:
    """The compiled constraint a request asks for (`response_format`, `structured_outputs`, `guided_*`),
    applied from the first token or only after `start_after` (the end of a thought); None if it asks none."""
    try:
        found = request.constraint_spec()
    except json.JSONDecodeError as exc:
        raise APIError(f"the JSON schema is not valid JSON ({exc})", param="structured_outputs") from exc
    if found is None:
        return None
    kind, spec, field = found
    try:
        constraint = compile_constraint(
            engine.tokenizer, kind, spec, eos_ids=tuple(sorted(engine.stop_token_ids))
        )
    except ConstraintError as exc:
        raise APIError(str(exc), param=field) from exc
    return constraint.after(start_after) if start_after is not None else constraint


def tool_call_constraint(
    engine: Any, tools: list[dict[str, Any]], *, name: str | None, parallel: bool
) -> Constraint | None:
    """The grammar of a forced tool call (`tool_choice` "required" or a named function): declared names and
    arguments that follow each tool's schema. None when llguidance is not installed (the call is then only
    prefilled, as before)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return None
    lark = tool_call_grammar(tools, engine.tokenizer, name=name, parallel=parallel)
    try:
        return compile_constraint(
            engine.tokenizer, "grammar", lark, eos_ids=tuple(sorted(engine.stop_token_ids))
        )
    except ConstraintError as exc:
        raise APIError(
            f"the tools' parameter schemas cannot be compiled to a grammar: {exc}", param="tools"
        ) from exc
