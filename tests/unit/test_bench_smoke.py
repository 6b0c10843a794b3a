"""Smoke tests of the speed benchmarks (bench/training, bench/serving, bench/api_load), so they
cannot rot silently. Speed itself is measured by the benchmarks, never asserted here.

* training: the real command at toy size (a tiny random-initialised Llama on the CPU, every
  variant in its own process — ours packed and padded, TRL — plus the incremental retrain);
* api_load: wrk's output parsing and the row accounting (pure), then the real harness for two
  seconds per endpoint (wrk, `python -m app`, a fresh Postgres database);
* serving: the summary arithmetic on made-up cells (the real run needs vLLM for minutes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.api_load.accounting import account_rows, parse_wrk_output
from bench.serving.report import adapters_vs_one, mix_summary

pytestmark = pytest.mark.slow


def test_training_benchmark_runs_every_variant_and_the_retrain(tmp_path: Path) -> None:
    from bench.training.__main__ import main

    out = tmp_path / "training.json"
    args = ["--plan", "smoke", "--gpu-config", "tiny", "--out", str(out)]
    assert main([*args, "--work-dir", str(tmp_path / "work")]) == 0

    payload = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("# Training throughput")
    variants = {"ours_dpo", "ours_dpo_padded", "ours_bapo", "ours_bapo_padded", "trl_dpo"}
    assert set(payload["summary"]["variants"]) == variants
    runs = payload["runs"]
    assert {r["epoch_pair_tokens"] for r in runs} == {runs[0]["epoch_pair_tokens"]} != {0}
    assert all(r["pair_tokens_per_s"] > 0 and r["steps"] == 2 for r in runs)
    run = {r["variant"]: r for r in runs}
    # Padded rows repeat the prompt per sequence; packed segments forward it once.
    assert run["ours_dpo_padded"]["forwarded_tokens"] == run["ours_dpo"]["pair_tokens"]
    assert run["ours_dpo"]["forwarded_tokens"] < run["ours_dpo_padded"]["forwarded_tokens"]
    assert run["ours_bapo"]["forwarded_tokens"] > run["ours_dpo"]["forwarded_tokens"]
    assert run["ours_bapo_padded"]["forwarded_tokens"] > run["ours_bapo"]["forwarded_tokens"]
    # TRL's forward hook counts prompt+chosen and prompt+rejected rows: the pair tokens.
    assert run["trl_dpo"]["forwarded_tokens"] == run["trl_dpo"]["pair_tokens"]
    for r in runs:
        assert r["forwarded_positions"] >= r["forwarded_tokens"] > 0
        assert 0 <= r["padding_fraction"] < 1
        assert r["positions_per_pair"] == r["forwarded_positions"] / (r["num_pairs"] * r["epochs"])
    dpo_vs_trl = payload["summary"]["comparisons"]["ours_dpo_vs_trl_dpo"]
    assert math.isfinite(dpo_vs_trl["throughput_ratio"]) and dpo_vs_trl["throughput_ratio"] > 0
    ratios = payload["ratios"]
    for key in ("bapo_vs_trl_dpo", "dpo_vs_trl_dpo", "peak_memory_vs_trl_dpo",
                "peak_memory_dpo_vs_trl_dpo"):  # fmt: skip
        assert isinstance(ratios[key], float) and ratios[key] > 0, key
    assert set(ratios["padding_fraction"]) == variants
    assert all(isinstance(v, float) for v in ratios["padding_fraction"].values())
    assert set(ratios["packed_vs_padded"]) == {"bapo", "dpo"}
    assert all(isinstance(v, float) and v > 0 for v in ratios["packed_vs_padded"].values())
    assert ratios["dpo_vs_trl_dpo"] == dpo_vs_trl["cpu_throughput_ratio"]
    # The retrain computes only the new pair's base response and reference log-probs.
    stats = payload["summary"]["incremental"]["cache_stats_retrain"]
    assert stats == {"base_computed": 1, "base_reused": 4, "ref_computed": 3, "ref_reused": 12}
    assert [g["name"] for g in payload["goals"]][:3] == [
        "our DPO / TRL DPO, pair tokens per CPU-second",
        "our BAPO / TRL DPO, pair tokens per CPU-second",
        "our BAPO / TRL DPO, peak RSS",
    ]
    assert all(r["train_loop_cpu_s"] > 0 for r in runs)
    assert payload["machine"]["cpu_model"] and payload["machine"]["versions"]["trl"]


WRK_OUTPUT = """\
requests 10
duration_us 2000000
bytes 1234
socket_errors 0 0 0 1
non_2xx_3xx 0
latency_p50_us 1500
latency_p90_us 3000
latency_p99_us 9000
latency_mean_us 2000
latency_max_us 9500
acked r1-t1-1
acked r1-t1-2
status 201 6
retries 1
replays 1
acked r1-t2-1
status 201 3
retries 0
replays 0
"""


def test_wrk_output_parsing() -> None:
    run = parse_wrk_output(WRK_OUTPUT)
    assert run.requests == 10 and run.requests_per_s == 5.0
    assert run.acked == {"r1-t1-1", "r1-t1-2", "r1-t2-1"}
    assert run.statuses == {201: 9}
    assert (run.retries, run.replays) == (1, 1)
    assert run.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 1}
    assert run.latency_s["p99"] == pytest.approx(0.009)


def test_row_accounting_finds_lost_duplicated_and_unacknowledged_rows() -> None:
    acked = {"a", "b", "c"}
    clean = account_rows(acked, {"a": 1, "b": 1, "c": 1, "cut-off": 1})
    assert clean.ok and clean.unacknowledged_rows == 1 and clean.stored_rows == 4
    broken = account_rows(acked, {"a": 1, "b": 3})
    assert (broken.lost, broken.duplicated, broken.ok) == (1, 2, False)


def test_api_load_harness_counts_every_acknowledged_pair(tmp_path: Path) -> None:
    from bench.api_load.__main__ import main  # installs wrk from Debian when it is missing

    out = tmp_path / "api_load.json"
    args = ["--plan", "smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    assert main(args) == 0

    payload = json.loads(out.read_text())
    rows = payload["summary"]["rows"]
    assert rows["acknowledged_keys"] > 0 and rows["lost"] == 0 and rows["duplicated"] == 0
    assert rows["stored_keys"] >= rows["acknowledged_keys"]
    assert payload["summary"]["replays_seen"] > 0  # retries happened and were replayed
    correctness = [g for g in payload["goals"] if "requests/s" not in g["name"]]
    assert len(correctness) == 3 and all(g["met"] for g in correctness)  # speed is not asserted
    endpoints = payload["summary"]["endpoints"]
    assert (
        endpoints["healthz"]["requests_per_s"] > 0 and endpoints["feedback"]["requests_per_s"] > 0
    )
    ratio = payload["summary"]["ratios"]["feedback_vs_healthz"]
    assert payload["summary"]["concurrency"] == 4 and math.isfinite(ratio) and ratio > 0
    assert ratio == payload["summary"]["feedback_vs_healthz_rps"]
    assert payload["goals"][-1]["name"] == "feedback / healthz requests/s at concurrency 4"


def _cell(mix: str, path: str, round_index: int, tokens_per_s: float, p50: float) -> dict:
    figures = {"tokens_per_s": tokens_per_s, "p50_s": p50, "p99_s": p50 * 1.5, "output_tokens": 768}
    return {"mix": mix, "path": path, "round": round_index, "errors": 0,
            "mean_output_tokens": 48.0, "api_cpu_s": 1.0, "vllm_cpu_s": 2.0, **figures}  # fmt: skip


def test_serving_summary_takes_ratios_within_each_round() -> None:
    cells = [
        _cell("1 adapter", "direct", 1, 100.0, 10.0),
        _cell("1 adapter", "api", 1, 90.0, 11.0),
        _cell("1 adapter", "direct", 2, 50.0, 20.0),  # a noisy round: both paths slow
        _cell("1 adapter", "api", 2, 50.0, 20.0),
        _cell("16 adapters", "direct", 1, 80.0, 12.0),
        _cell("16 adapters", "api", 1, 72.0, 13.0),
        _cell("16 adapters", "direct", 2, 45.0, 22.0),
        _cell("16 adapters", "api", 2, 40.0, 24.0),
    ]
    summary = mix_summary(cells)
    assert summary["1 adapter"]["api_vs_direct_per_round"] == [0.9, 1.0]
    assert summary["1 adapter"]["api_vs_direct"] == pytest.approx(0.95)
    assert summary["1 adapter"]["api_p50_overhead"] == pytest.approx(0.05)
    assert adapters_vs_one(cells, "direct", "16 adapters") == pytest.approx((0.8 + 0.9) / 2)
