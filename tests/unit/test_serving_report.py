"""bench.serving's summary, ratios, goals and Markdown on made-up measurements (the real run needs
vLLM for minutes; tests/unit/test_bench_smoke.py covers the per-round cell arithmetic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.serving import replicas, report


def _cell(mix: str, path: str, round_index: int, tokens_per_s: float) -> dict[str, Any]:
    return {"mix": mix, "path": path, "round": round_index, "errors": 0, "output_tokens": 768,
            "tokens_per_s": tokens_per_s, "p50_s": 10.0, "p99_s": 12.0,
            "mean_output_tokens": 48.0, "api_cpu_s": 1.0, "vllm_cpu_s": 2.0}  # fmt: skip


def _replica_cell(path: str, round_index: int, tokens_per_s: float) -> dict[str, Any]:
    servers = {
        "vllm-1": {"completions": 16, "resolved": 0, "load_calls": 0, "cpu_s": 9.0},
        "vllm-2": {"completions": 0, "resolved": 0, "load_calls": 0, "cpu_s": 0.1},
    }
    if path == "two servers":
        servers = {name: {**figures, "completions": 8, "cpu_s": 5.0}
                   for name, figures in servers.items()}  # fmt: skip
    return {**_cell("4 adapters", path, round_index, tokens_per_s), "servers": servers}


def _versus(rounds: list[tuple[float, float]]) -> dict[str, Any]:
    runs = []
    for k, (batched, serial) in enumerate(rounds, start=1):
        runs.append({"round": k, "variant": "batched", "tokens": 128,
                     "elapsed_s": 128 / batched, "tokens_per_s": batched})  # fmt: skip
        runs.append({"round": k, "variant": "serialized", "tokens": 128,
                     "elapsed_s": 128 / serial, "tokens_per_s": serial,
                     "same_text_as_other_variant": True})  # fmt: skip
    return {"users": 8, "adapters": 8, "max_tokens": 16, "rounds": len(rounds), "runs": runs}


def _local(versus: dict[str, Any]) -> dict[str, Any]:
    switch = {"max_tokens": 4, "repeats": 1, "switch_overhead_s": 0.0, "load_overhead_s": 0.4,
              "median_s": {"same": 0.5, "switch": 0.5, "load": 0.9, "base": 0.5}}  # fmt: skip
    speed = {"tokens": 128, "elapsed_s": 4.0, "tokens_per_s": 32.0}
    return {"switch": switch, "backend_throughput": {"base": speed},
            "peft_batched_reference": {"one adapter (batched)": speed},
            "batched_vs_serialized": versus, "threads": 1, "requests": 8,
            "max_tokens": 16}  # fmt: skip


def _measured() -> dict[str, Any]:
    cells = [_cell(mix, path, r, 60.0) for r in (1, 2)
             for mix in ("base", "1 adapter", "4 adapters", "16 adapters")
             for path in ("direct", "api")]  # fmt: skip
    two = [
        _replica_cell("one server", 1, 60.0),
        _replica_cell("two servers", 1, 54.0),
        _replica_cell("one server", 2, 40.0),
        _replica_cell("two servers", 2, 40.0),
    ]
    logs = {"vllm-1": {"completions": 99, "resolved": 16, "load_calls": 4},
            "vllm-2": {"completions": 40, "resolved": 4, "load_calls": 0}}  # fmt: skip
    swap = {"api_swap_s": 0.3, "activate_s": 0.02, "direct_swap_s": 0.3, "ttft_loaded_s": 0.2}
    probe = {"direct_p50_s": 0.2, "api_p50_s": 0.22, "overhead_s": 0.02,
             "api_cpu_s_per_request": 0.01}  # fmt: skip
    return {"cells": cells, "hot_swaps": [swap], "overhead_probe": probe,
            "resolver_before_hot_swaps": {"completions": 80, "resolved": 16, "load_calls": 0},
            "two_replicas": {"cells": two, "server_logs": logs,
                             "bound_cores": {"vllm-1": "[0]", "vllm-2": "[0]"}},
            "local": _local(_versus([(30.0, 10.0), (24.0, 12.0), (33.0, 11.0)]))}  # fmt: skip


def _payload(measured: dict[str, Any], gpu: Any = None) -> dict[str, Any]:
    summary = report.summarize(measured)
    payload = {"plan": {"mode": "quick", "max_loras": 4, "max_cpu_loras": 16, "concurrency": 16,
                        "requests": 16, "max_tokens": 48, "rounds": 2},
               "timestamp": "now", "summary": summary, "ratios": report.ratios(summary),
               "goals": [g.to_json() for g in report.goals(summary)], "measured": measured,
               "machine": {"cpu_model": "x", "cpu_cores": 2, "ram_gib": 1.0, "gpu": gpu,
                           "load_average_at_start": [0, 0, 0], "versions": {}}}  # fmt: skip
    payload["notes"] = report.notes(payload)
    return payload


def test_ratios_are_medians_of_per_round_ratios() -> None:
    payload = _payload(_measured())
    # local: 3.0, 2.0, 3.0 per round; two replicas: 0.9, 1.0 per round
    assert payload["ratios"] == {
        "local_batched_vs_serial": pytest.approx(3.0),
        "two_replicas_vs_one": pytest.approx(0.95),
    }
    spread = payload["summary"]["two_replicas"]["paths"]["two servers"]["answered_by"]
    assert spread == {"vllm-1": 16, "vllm-2": 16}  # both servers answered
    local_goal = payload["goals"][-1]
    assert local_goal["name"].startswith("local backend: batched / serialized")
    assert (local_goal["target"], local_goal["met"]) == (2.5, True)


def test_markdown_has_every_part_and_the_cpu_note() -> None:
    payload = _payload(_measured())
    text = report.markdown(payload)
    for heading in ("## Ratios", "## Two vLLM replicas vs one", "### Batched vs serialized",
                    "### Adapters found by name", "## Notes"):  # fmt: skip
        assert heading in text
    assert "**3.00×**" in text and "**0.95**" in text
    assert "loaded 16 adapters by name on vllm-1 before the hot swaps, with 0" in text
    assert any("not the capacity" in n and "[0]: the same core" in n for n in payload["notes"])
    assert not any(
        "not the capacity" in n for n in _payload(_measured(), gpu={"name": "H200"})["notes"]
    )


def test_local_only_run_reports_the_local_goal_alone() -> None:
    measured = {"local": _local(_versus([(20.0, 10.0)]))}
    payload = _payload(measured)
    assert payload["ratios"] == {"local_batched_vs_serial": 2.0, "two_replicas_vs_one": None}
    assert [g["met"] for g in payload["goals"]] == [False]  # 2.0 < 2.5
    text = report.markdown(payload)
    assert "## Adapter mixes" not in text and "### Batched vs serialized" in text


def test_vllm_log_counts(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text(
        'INFO:     127.0.0.1:1 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n'
        "INFO [serving.py:332] Resolved and loaded LoRA adapter 'user-a-v1' using "
        "FilesystemResolver\n"
        'INFO:     127.0.0.1:2 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n'
        'INFO:     127.0.0.1:3 - "POST /v1/load_lora_adapter HTTP/1.1" 200 OK\n'
    )
    assert replicas.log_counts(log) == {"completions": 2, "resolved": 1, "load_calls": 1}
    assert replicas.bound_cores(log) is None
    log.write_text("INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0, 1]\n")
    assert replicas.bound_cores(log) == "[0, 1]"
    assert replicas.log_counts(tmp_path / "missing.log")["completions"] == 0
