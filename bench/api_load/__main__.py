"""`python -m bench.api_load [--quick]`: feedback ingestion under wrk load, against /healthz.

Needs wrk (installed from Debian when missing) and Postgres (127.0.0.1:5432, or
TEST_POSTGRES_ADMIN_URL).
Results: bench/results/api_load.json + .md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.api_load.benchmark import PLANS, LoadPlan, run_benchmark, wrk_binary
from bench.common import (
    RESULTS_DIR,
    Goal,
    fmt,
    goals_json,
    goals_table,
    machine_info,
    machine_line,
    table,
    utc_now,
    write_results,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round of 8 s per endpoint")
    parser.add_argument("--plan", choices=sorted(PLANS), help="explicit plan (overrides --quick)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, help="concurrent connections (default 32)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "api_load.json")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bapo-bench-api-load"))
    return parser.parse_args(argv)


FEEDBACK_VS_HEALTHZ_TARGET = 0.4  # feedback requests/s as a share of /healthz's (issue #19)


def goals(summary: dict[str, Any]) -> list[Goal]:
    """Zero lost and zero duplicated rows; every feedback request answered 2xx; feedback at least
    FEEDBACK_VS_HEALTHZ_TARGET of /healthz's requests/s."""
    rows = summary["rows"]
    feedback = summary["endpoints"]["feedback"]
    note = f"{rows['acknowledged_keys']} keys acknowledged, {rows['stored_rows']} rows stored"
    per_round = ", ".join(fmt(x) for x in summary["feedback_vs_healthz_rps_per_round"])
    return [
        Goal("lost rows (acknowledged 201, no row)", rows["lost"], 0, "<=", note),
        Goal("duplicated rows (one key stored twice)", rows["duplicated"], 0, "<=",
             f"{summary['retries_sent']} retries sent, {summary['replays_seen']} replays seen"),
        Goal("feedback responses not 2xx", feedback["non_2xx"], 0, "<="),
        Goal(f"feedback / healthz requests/s at concurrency {summary['concurrency']}",
             summary["ratios"]["feedback_vs_healthz"], FEEDBACK_VS_HEALTHZ_TARGET, ">=",
             f"median of the rounds ({per_round})"),
    ]  # fmt: skip


def markdown(payload: dict[str, Any]) -> str:
    """The summary."""
    s, plan = payload["summary"], payload["plan"]
    return "\n\n".join(
        [
            f"# API load: feedback ingestion ({plan['mode']})",
            f"Run {payload['timestamp']}. {machine_line(payload['machine'])} PostgreSQL "
            f"{payload['postgres']}; {payload['wrk']}.",
            f"`python -m app` (one uvicorn process, production logging) on a fresh migrated "
            f"database; wrk {plan['threads']} threads, {plan['connections']} connections, "
            f"{plan['duration_s']} s per run, {plan['rounds']} round(s), /healthz and feedback "
            f"alternating; one pair per POST, a unique Idempotency-Key each, "
            f"{plan['retry_fraction']:.0%} of requests re-send a recent key (a retry).",
            "## Goals\n\n" + goals_table([Goal.from_json(g) for g in payload["goals"]]),
            "## Throughput (medians over rounds)\n\n" + endpoints_table(s),
            "## Rows afterwards\n\n" + rows_table(s["rows"]),
        ]
    )


def endpoints_table(s: dict[str, Any]) -> str:
    """Requests/s and latency per endpoint, and the ratios."""
    header = ["endpoint", "requests/s", "p50 ms", "p99 ms", "non-2xx", "socket errors"]
    rows = [
        [endpoint, fmt(e["requests_per_s"], 1), fmt(e["p50_s"] * 1000, 1),
         fmt(e["p99_s"] * 1000, 1), e["non_2xx"], e["socket_errors"]]
        for endpoint, e in s["endpoints"].items()
    ]  # fmt: skip
    per_round = ", ".join(fmt(x) for x in s["feedback_vs_healthz_rps_per_round"])
    return (
        table(header, rows)
        + f"\n\nFeedback / healthz: requests/s {fmt(s['feedback_vs_healthz_rps'])} (per round "
        f"{per_round}); p99 {fmt(s['feedback_vs_healthz_p99'])}× healthz's."
    )


def rows_table(account: dict[str, Any]) -> str:
    """The row accounting."""
    header = ["acknowledged keys", "keys stored", "rows stored", "lost", "duplicated",
              "rows never acknowledged (cut off at wrk's deadline)"]  # fmt: skip
    keys = ("acknowledged_keys", "stored_keys", "stored_rows", "lost", "duplicated",
            "unacknowledged_rows")  # fmt: skip
    return table(header, [[account[k] for k in keys]])


def wrk_version() -> str:
    """wrk's version line."""
    done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip()


def main(argv: list[str] | None = None) -> int:
    """Run, write the results, print the goals."""
    from bench.training.benchmark import timed

    args = parse_args(argv)
    plan: LoadPlan = PLANS[args.plan or ("quick" if args.quick else "full")]
    overrides = {"duration_s": args.duration, "connections": args.connections,
                 "rounds": args.rounds}  # fmt: skip
    plan = replace(plan, **{k: v for k, v in overrides.items() if v})
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    machine = machine_info()
    measured = run_benchmark(plan, work, timed(print))
    payload = {
        "benchmark": "api_load",
        "timestamp": utc_now(),
        "machine": machine,
        "wrk": wrk_version(),
        "plan": asdict(plan),
        "command": " ".join(sys.argv),
        **measured,
        "ratios": measured["summary"]["ratios"],  # top level, like the other benchmarks' results
        "goals": goals_json(goals(measured["summary"])),
    }
    json_path, md_path = write_results(args.out, payload, markdown(payload))
    print(markdown(payload).split("## Rows")[0])
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
