"""A Lark grammar (llguidance dialect) for Gemma 4 tool calls whose arguments follow the tools' JSON schemas.

`tool_choice: "required"` prefills `<|tool_call>call:` and a named function `<|tool_call>call:NAME{`; with
this grammar the rest is constrained too: a declared name, then arguments in Gemma's notation (`key:value`
pairs with bare keys in sorted order, as the template writes them; strings between `<|"|>` tokens; bare
numbers, `true`/`false`/`null`; `[...]` lists; `{...}` mappings), every required key present, then
`<tool_call|>`. With parallel calls allowed, more `<|tool_call>call:...<tool_call|>` may follow.
Modelled: types, `enum`/`const`, `required`, `maxLength`, small integer ranges (at most 257 values); other
schema parts (`anyOf`, `$ref`, patterns, wide ranges, ...) accept any value of the type, or any Gemma value.
"""

from __future__ import annotations

import json
from typing import Any

from nvfp4kit.tokenizer import Tokenizer

_INTEGER = r"/-?(0|[1-9][0-9]*)/"
_NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"


class _Rules:
    def __init__(self, quote: str) -> None:
        self.quote = quote  # the `<|"|>` string delimiter, as a special-token reference
        self.lines: list[str] = []
        self.count = 0

    def add(self, body: str) -> str:
        self.count += 1
        name = f"r{self.count}"
        self.lines.append(f"{name}: {body}")
        return name

    def string(self, literal: str | None = None, *, length: int | None = None) -> str:
        if literal is not None:
            inner = json.dumps(literal)
        else:
            inner = r"/(?s:[^\x00]" + ("*" if length is None else f"{{0,{length}}}") + ")/"
        return f"{self.quote} {inner} {self.quote}"

    def value(self, schema: Any) -> str:
        """A rule (or inline expression) for one value of `schema`."""
        if not isinstance(schema, dict):
            return "any_value"
        if "enum" in schema or "const" in schema:
            options = schema.get("enum", [schema.get("const")])
            return "(" + " | ".join(self._literal(v) for v in options) + ")"
        kinds = schema.get("type")
        if isinstance(kinds, list):
            return "(" + " | ".join(self.value({**schema, "type": k}) for k in kinds) + ")"
        if kinds == "string":
            limit = schema.get("maxLength")
            return self.string(length=limit if isinstance(limit, int) and limit >= 0 else None)
        if kinds == "integer":
            low, high = schema.get("minimum"), schema.get("maximum")
            if isinstance(low, int) and isinstance(high, int) and 0 <= high - low <= 256:
                return (
                    "(" + " | ".join(f'"{v}"' for v in range(low, high + 1)) + ")"
                )  # a small range, exactly
            return _INTEGER
        if kinds == "number":
            return _NUMBER
        if kinds == "boolean":
            return '("true" | "false")'
        if kinds == "null":
            return '"null"'
        if kinds == "array":
            item = self.value(schema.get("items", {}))
            return self.add(f'"[" ({item} ("," {item})*)? "]"')
        if kinds == "object" or "properties" in schema:
            return self.mapping(schema)
        return "any_value"

    def _literal(self, value: Any) -> str:
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, bool) or value is None:
            return json.dumps(json.dumps(value))
        if isinstance(value, (int, float)):
            return json.dumps(str(value))
        return "any_value"

    def mapping(self, schema: dict[str, Any], *, closed_by_prefill: bool = False) -> str:
        """`{key:value,...}`, keys sorted; required keys present, optional ones may be left out."""
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        keys = sorted(properties)
        if not keys:
            body = '(any_pair ("," any_pair)*)?'
            return self.add(f'"{{" {body} "}}"') if not closed_by_prefill else self.add(f'{body} "}}"')
        pairs = [f'"{k}:" {self.value(properties[k])}' for k in keys]
        # tail: the pairs after i, each after a comma; head: the pairs from i on, the first present without one
        tail, head = "", ""
        for i in range(len(keys) - 1, -1, -1):
            optional = keys[i] not in required
            first_here = f"{pairs[i]} {tail}".strip()
            head = self.add(f"{first_here} | {head}" if optional and head else first_here)
            tail = self.add(f'("," {pairs[i]})? {tail}' if optional else f'"," {pairs[i]} {tail}'.strip())
        body = f"({head})?" if not required else head
        return self.add(f'{body} "}}"') if closed_by_prefill else self.add(f'"{{" {body} "}}"')


def tool_call_grammar(
    tools: list[dict[str, Any]], tokenizer: Tokenizer, *, name: str | None = None, parallel: bool = True
) -> str:
    """Lark text for what the model writes after the prefill: `NAME{args}<tool_call|>` for "required"
    (after `call:`), or `args}<tool_call|>` for a named function (after `call:NAME{`)."""
    ids = tokenizer.special_tokens
    quote, call_open, call_close = (f"<[{ids[t]}]>" for t in ('<|"|>', "<|tool_call>", "<tool_call|>"))
    rules = _Rules(quote)
    functions = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    calls = []
    for function, parameters in sorted(functions.items()):
        calls.append(f'"{function}" {rules.mapping(parameters)}')
    any_call = rules.add(" | ".join(calls))
    if name is not None:
        first = f"{rules.mapping(functions[name], closed_by_prefill=True)} {call_close}"
    else:
        first = f"{any_call} {call_close}"
    more = f' ({call_open} "call:" {any_call} {call_close})*' if parallel else ""
    generic = [
        f'any_value: {rules.string()} | {_NUMBER} | "true" | "false" | "null"'
        ' | "[" (any_value ("," any_value)*)? "]" | "{" (any_pair ("," any_pair)*)? "}"',
        'any_pair: /[A-Za-z_][A-Za-z0-9_]*/ ":" any_value',
    ]
    return "\n".join([f"start: {first}{more}", *rules.lines, *generic])
