"""Feedback ingestion under load: wrk against `python -m app` on a fresh Postgres database.

wrk (a separate process, on loopback) runs /healthz and POST /users/{id}/feedback in alternating
order, each for the same duration at the same concurrency; the ratio of their requests/s and p99
is taken within each round. Afterwards every key acknowledged with a 201 must have exactly one
stored pair (see bench.api_load.accounting).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.api_load.accounting import WrkRun, account_rows, read_wrk_output, rows_per_key
from bench.common import ApiProcess, free_port, median, ratio

Log = Callable[[str], None]
HERE = Path(__file__).resolve().parent
OPERATOR_KEY = "bench-operator-key-0123456789"


@dataclass(frozen=True)
class LoadPlan:
    """Sizes of one run."""

    mode: str
    duration_s: int
    rounds: int
    connections: int = 32
    threads: int = 2
    users: int = 8
    retry_fraction: float = 0.1
    warmup_s: int = 3
    timeout_s: int = 10


PLANS = {
    "full": LoadPlan("full", duration_s=20, rounds=3),
    "quick": LoadPlan("quick", duration_s=8, rounds=1),
    "smoke": LoadPlan("smoke", duration_s=2, rounds=1, connections=4, threads=1, users=2,
                      warmup_s=1),
}  # fmt: skip


def wrk_binary() -> str:
    """The wrk executable, or a clear error saying how to install it."""
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk (or make system-deps)")
    return found


def ensure_wrk(log: Log) -> str:
    """wrk, installed from Debian first when it is missing (as `make system-deps` does)."""
    if shutil.which("wrk") is None and shutil.which("apt-get") is not None:
        log("wrk is missing: apt-get install -y wrk")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return wrk_binary()


def run_wrk(
    plan: LoadPlan, url: str, script: str, duration_s: int, env: dict[str, str], out: Path
) -> WrkRun:
    """One wrk run of a Lua script; its figures come back through the script's output file."""
    command = [
        wrk_binary(), f"-t{plan.threads}", f"-c{plan.connections}", f"-d{duration_s}s",
        f"--timeout={plan.timeout_s}s", "-s", str(HERE / script), url,
    ]  # fmt: skip
    full_env = {**os.environ, **env, "BENCH_OUT": str(out)}
    done = subprocess.run(
        command, env=full_env, capture_output=True, text=True, timeout=duration_s + 120, check=False
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    return read_wrk_output(out)


def create_users(api_url: str, count: int, path: Path) -> None:
    """Users via the API (operator key); their ids and keys to `path` for the Lua script."""
    lines = []
    with httpx.Client(base_url=api_url, timeout=30) as client:
        for i in range(count):
            response = client.post(
                "/users",
                json={"id": f"load{i:02d}"},
                headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
            )
            response.raise_for_status()
            lines.append(f"{response.json()['id']} {response.json()['api_key']}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Measured:
    """Every wrk run, by endpoint, with its round."""

    runs: list[dict[str, Any]]
    acked: set[str]


def measure(plan: LoadPlan, api_url: str, work: Path, log: Log) -> Measured:
    """Warm up, then the rounds: healthz and feedback in alternating order."""
    users_file = work / "users.txt"
    create_users(api_url, plan.users, users_file)
    acked: set[str] = set()
    runs: list[dict[str, Any]] = []

    def one(endpoint: str, label: str, duration: int, round_index: int) -> None:
        out = work / f"wrk-{label}-{endpoint}.txt"
        if endpoint == "feedback":
            env = {"BENCH_USERS": str(users_file), "BENCH_RETRY": str(plan.retry_fraction),
                   "BENCH_RUN": label}  # fmt: skip
            run = run_wrk(plan, api_url, "feedback.lua", duration, env, out)
            acked.update(run.acked)
        else:
            run = run_wrk(plan, api_url, "healthz.lua", duration, {}, out)
        if round_index > 0:
            runs.append({"endpoint": endpoint, "round": round_index, **run.to_json()})
            p99_ms = run.latency_s.get("p99", 0) * 1000
            log(f"round {round_index} {endpoint:>8}: {run.requests_per_s:7.1f} req/s, "
                f"p99 {p99_ms:.0f} ms, non-2xx {run.non_2xx}")  # fmt: skip

    one("healthz", "warm", plan.warmup_s, 0)
    one("feedback", "warm", plan.warmup_s, 0)
    for r in range(1, plan.rounds + 1):
        order = ("healthz", "feedback") if r % 2 else ("feedback", "healthz")
        for endpoint in order:
            one(endpoint, f"r{r}", plan.duration_s, r)
    return Measured(runs, acked)


def summarize(measured: Measured, rows: dict[str, int], connections: int) -> dict[str, Any]:
    """Medians per endpoint, per-round ratios (the median one under `ratios`), the row count."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in measured.runs:
        by_round.setdefault(run["round"], {})[run["endpoint"]] = run
    endpoints: dict[str, Any] = {}
    for endpoint in ("healthz", "feedback"):
        runs = [r for r in measured.runs if r["endpoint"] == endpoint]
        endpoints[endpoint] = {
            "requests_per_s": median([r["requests_per_s"] for r in runs]),
            "p50_s": median([r["latency_s"]["p50"] for r in runs]),
            "p99_s": median([r["latency_s"]["p99"] for r in runs]),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": sum(sum(r["socket_errors"].values()) for r in runs),
        }
    pairs = [p for p in by_round.values() if "healthz" in p and "feedback" in p]
    rps = [ratio(p["feedback"]["requests_per_s"], p["healthz"]["requests_per_s"]) for p in pairs]
    p99 = [
        ratio(p["feedback"]["latency_s"]["p99"], p["healthz"]["latency_s"]["p99"]) for p in pairs
    ]
    account = account_rows(measured.acked, rows)
    return {
        "concurrency": connections,
        "ratios": {"feedback_vs_healthz": median(rps)},
        "endpoints": endpoints,
        "feedback_vs_healthz_rps": median(rps),
        "feedback_vs_healthz_rps_per_round": rps,
        "feedback_vs_healthz_p99": median(p99),
        "feedback_vs_healthz_p99_per_round": p99,
        "rows": account.__dict__,
        "retries_sent": sum(r["retries"] for r in measured.runs if r["endpoint"] == "feedback"),
        "replays_seen": sum(r["replays"] for r in measured.runs if r["endpoint"] == "feedback"),
    }


def run_benchmark(plan: LoadPlan, work: Path, log: Log) -> dict[str, Any]:
    """Fresh database, the API process, wrk rounds, then the row count."""
    from tests.support import postgres_database

    ensure_wrk(log)
    with postgres_database() as database_url:
        env = {
            "DATABASE_URL": database_url, "OPERATOR_KEY": OPERATOR_KEY,
            "DATA_DIR": str(work / "api-data"), "INFERENCE_BACKEND": "local",
        }  # fmt: skip
        api = ApiProcess(env, work / "api.log", free_port()).start()
        try:
            measured = measure(plan, api.url, work, log)
            time.sleep(1.0)  # requests wrk abandoned at its deadline finish server-side
        finally:
            api.stop()
        rows = rows_per_key(database_url)
        postgres = server_version(database_url)
    summary = summarize(measured, rows, plan.connections)
    return {"summary": summary, "runs": measured.runs, "postgres": postgres}


def server_version(database_url: str) -> str:
    """Postgres's version string."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar())
    finally:
        engine.dispose()
