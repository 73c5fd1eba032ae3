"""The plan as readable tables (the same numbers `--json` prints)."""

from __future__ import annotations

from typing import Any

from nvfp4kit.plan.units import GB, GiB, format_count

_LABELS = {
    "embeddings": "embeddings (= tied lm_head)",
    "per_layer_embeddings": "per-layer embedding tables",
    "per_layer_projections": "per-layer input projections",
    "vision": "vision tower",
    "audio": "audio tower (not loaded)",
}


def _g(n: float | None, digits: int = 2) -> str:
    return "-" if n is None else f"{n / GiB:.{digits}f}"


def _b(n: float | None) -> str:
    return "-" if not n else f"{n / 1e9:.2f} B"


def _model_lines(plan: dict[str, Any]) -> list[str]:
    m = plan["model"]
    experts = m["experts"]
    moe = f" ({experts['total']} experts, top {experts['top_k']})" if experts else ""
    shared = f", {m['kv_shared_layers']} of them reuse earlier layers' KV" if m["kv_shared_layers"] else ""
    layers = m["sliding_layers"] + m["full_layers"]
    towers = [f"{k} tower {_b(m[f'{k}_params'])} params" for k in ("vision", "audio") if m[f"{k}_params"]]
    lines = [
        f"{m['name']} ({m['source']}): text tower {_b(m['text_params'])} parameters, "
        f"{_b(m['active_params'])} active per token{moe}",
        f"  {layers} layers = {m['sliding_layers']} sliding (window {m['sliding_window']}) + "
        f"{m['full_layers']} global{shared}; max context {m['max_position_embeddings']:,}",
    ]
    if towers:
        planned = plan["weights"].get("vision_planned")
        note = "vision planned below; --no-vision leaves it out" if planned else "vision not planned"
        lines.append(f"  {'; '.join(towers)} ({note})")
    g = plan["gpu"]
    bw = f", {g['bandwidth_bytes_per_s'] / GB:,.0f} GB/s" if g["bandwidth_bytes_per_s"] else ""
    if g["compute_capability"]:
        fp4 = "native FP4" if g["native_fp4"] else "FP4 as W4A16 (no FP4 tensor cores)"
        bw += f", sm {g['compute_capability']}, {fp4}"
    lines.append(
        f"GPU: {g['name']}, {_g(g['memory_bytes'])} GiB{bw}; {_g(g['preload_used_bytes'])} GiB in use before "
        f"loading -> {_g(g['free_bytes'])} GiB free"
    )
    return lines


def _weight_lines(plan: dict[str, Any]) -> list[str]:
    w = plan["weights"]
    lines = ["", f"Weights ({'recipe ' + w['recipe'] if w['source'] == 'config' else 'as stored'}, "
             f"from {w['source']})", f"  {'component':<32}{'format':<8}{'params':>10}{'GiB':>10}"]  # fmt: skip
    for comp, info in w["components"].items():
        label = _LABELS.get(comp, comp.replace("_", " "))
        lines.append(f"  {label:<32}{info['format']:<8}{_b(info['params']):>10}{_g(info['bytes'], 3):>10}")
    lines.append(f"  {'text tower (what the engine loads first)':<50}{_g(w['engine_bytes'], 3):>10}")
    if w.get("linear_copies_bytes"):
        label = "BF16 linear copies (--linear-copies)"
        lines.append(f"  {label:<50}{_g(w['linear_copies_bytes'], 3):>10}")
    lines.append(f"  {'checkpoint incl. towers (SGLang)':<50}{_g(w['checkpoint_bytes'], 3):>10}")
    return lines


def _kv_lines(plan: dict[str, Any]) -> list[str]:
    kv = plan["kv_bytes_per_token"]
    dtypes = list(kv)
    first = kv[dtypes[0]]
    lines = ["", f"  {'KV bytes per token':<38}" + "".join(f"{d:>12}" for d in dtypes)]
    rows = (
        (f"sliding layers ({first['sliding_layers']} store KV), K and V", "sliding"),
        (f"global layers ({first['full_layers']} store KV), K and V", "full"),
        ("global layers, K=V stored once", "full_k_eq_v_once"),
    )
    for label, key in rows:
        lines.append(f"  {label:<38}" + "".join(f"{kv[d][key]:>12,}" for d in dtypes))
    return lines


def _our_rows(us: dict[str, Any], *, limit: int, limit_note: str = "model limit") -> list[tuple[str, str]]:
    """nvfp4kit's pool column, row by row (label, value): shared by `plan` and the engine's start-up log."""
    r = us["reserve"]
    scratch = r.get("scratch", 0) + r.get("rotated_keys", 0)  # weight expansion + pre-rotated keys
    reserve = (
        f"{_g(r['total'])} (act {_g(r['activations'])}, logits {_g(r['logits'])}, "
        f"graphs {_g(r['cuda_graphs'])}, margin {_g(r['margin'])}"
        + (f", scratch {_g(scratch)})" if scratch else ")")
    )
    longest = f"{us['max_context']:,}" + (f" ({limit_note})" if us["max_context"] == limit else "")
    vision = us.get("vision")
    vision_rows = []
    if vision:  # text-only plans keep exactly the rows they had
        vision_rows = [(
            "vision tower, GiB",
            f"{_g(vision['total_bytes'])} (weights {_g(vision['weight_bytes'])}, encoder "
            f"{_g(vision['activation_bytes'])} for one {vision['soft_tokens']:,}-token image)",
        )]  # fmt: skip
    return [
        ("weights, GiB", _g(us["weights_bytes"])),
        *vision_rows,
        ("runtime reserve, GiB", reserve),
        ("KV budget, GiB", _g(us["kv_budget_bytes"])),
        ("global-layer KV tokens", f"{format_count(us['global_tokens'])} (with {us['concurrency']} ring(s))"),
        ("sliding-layer KV tokens", f"{us['ring_tokens']:,} ring per request"),
        ("longest single request", longest),
        (f"requests at {us['context']:,} tokens", f"{us['requests_at_context']:,}"),
    ]


def format_pool_rows(us: dict[str, Any], *, limit: int, limit_note: str = "model limit") -> list[str]:
    """nvfp4kit's pools alone (the `nvfp4kit` section of a plan, or `report.pool_summary`), one row a line."""
    rows = _our_rows(us, limit=limit, limit_note=limit_note)
    return [f"  {label:<28}{value}" for label, value in rows]


def _pool_lines(plan: dict[str, Any]) -> list[str]:
    sg, us = plan["sglang"], plan["nvfp4kit"]
    seed = f"SGLang {sg['mem_fraction_static']}/{sg['swa_full_tokens_ratio']}"
    limit = plan["model"]["max_position_embeddings"]
    longest_sg = f"{sg['max_context']:,}" + (" (model limit)" if sg["max_context"] == limit else "")
    theirs = [
        _g(sg["weights_bytes"]), f"{_g(sg['runtime_reserve_bytes'])} (1 - fraction)", _g(sg["kv_bytes"]),
        format_count(sg["full_tokens"]), f"{format_count(sg['swa_tokens'])} shared pool", longest_sg,
        f"{sg['requests_at_context']:,}",
    ]  # fmt: skip
    if us.get("vision"):
        theirs.insert(1, "(in weights)")  # SGLang loads the whole checkpoint, vision tower included
    rows = [(label, a, b) for a, (label, b) in zip(theirs, _our_rows(us, limit=limit))]
    kv_note = "K=V once" if us["k_eq_v_once"] else "K and V separate"
    lines = [
        "",
        f"Memory plan, KV {plan['kv_dtype']} ({seed}: --mem-fraction-static / --swa-full-tokens-ratio; "
        f"nvfp4kit: {kv_note}, prefill chunk {us['prefill_chunk']:,})",
        f"  {'':<26}{seed:<28}nvfp4kit",
    ]
    lines += [f"  {label:<26}{a:<28}{b}" for label, a, b in rows]
    if not sg["fits"]:
        lines.append("  SGLang would refuse to start: its SWA pool cannot hold one window")
    if not us["fits"]:
        lines.append("  nvfp4kit: the weights and reserve leave no room for one request's KV on this GPU")
    step = sg["full_tokens_per_0.01_fraction"]
    lines.append(
        f"  (+0.01 --mem-fraction-static gives SGLang {format_count(step)} more global-layer tokens)"
    )
    return lines


def _roofline_lines(plan: dict[str, Any]) -> list[str]:
    rows = plan["roofline"]
    if not rows:
        return ["", "Decode roofline: pass --gpu or --bandwidth to see it"]
    bw = plan["gpu"]["bandwidth_bytes_per_s"] / GB
    lines = [
        "",
        f"Decode roofline ({bw:,.0f} GB/s), every sequence at {rows[0]['context']:,} tokens",
        f"  {'batch':>5} {'GB/step':>9} {'experts GB':>11} {'KV GB':>7} {'lm_head GB':>11} {'tok/s':>9} {'tok/s/req':>10}",
    ]
    for row in rows:  # one space between columns always: a tiny model's rates have many digits
        parts = row["bytes_by_part"]
        lines.append(
            f"  {row['batch']:>5} {row['bytes_per_step'] / GB:>9.2f} {parts.get('experts', 0) / GB:>11.2f}"
            f" {parts['kv_cache'] / GB:>7.2f} {parts.get('lm_head', 0) / GB:>11.2f}"
            f" {row['tokens_per_s']:>9,.0f} {row['tokens_per_s_per_request']:>10,.0f}"
        )
    lines.append(
        "  (upper bounds: bytes read per step / bandwidth; compute is not the limit at these batches)"
    )
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    lines = _model_lines(plan) + _weight_lines(plan) + _kv_lines(plan) + _pool_lines(plan)
    lines += _roofline_lines(plan)
    return "\n".join(lines)
