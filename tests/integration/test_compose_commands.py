"""The exact commands the compose services run, run here against real Postgres and Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import make_engine, make_sessionmaker, transaction
from app.models import JobEvent, TrainingJob, User
from app.services import jobs as job_service
from app.services.feedback import store_pairs
from foundation.pairs import Pair
from tests.fault_support import private_redis
from tests.support import OPERATOR_KEY, free_port, make_settings, postgres_database
from tests.worker_support import (
    REPO_ROOT,
    TINY_TRAINING,
    flushed_redis_url,
    model_dir,
    settings_env,
    version_folders,
)

pytestmark = pytest.mark.slow
BIN = REPO_ROOT / ".venv" / "bin"
ARTIFACT = REPO_ROOT / "test-artifacts" / "compose_worker_shutdown.json"
# Long enough to be mid-training when the signal comes, short enough to finish afterwards.
STOPPABLE_TRAINING = {**TINY_TRAINING, "max_steps": 12}


def _compose_services() -> dict[str, Any]:
    text = (REPO_ROOT / "docker-compose.yml").read_text()
    text = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "x", text)  # required secrets: any value
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)  # defaults
    return dict(yaml.safe_load(text)["services"])


def _local(command: list[str]) -> list[str]:
    """The container command with its executable taken from this checkout's virtualenv."""
    return [str(BIN / command[0]), *command[1:]]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The compose app environment, pointed at a fresh Postgres database and the test Redis."""
    data_dir = tmp_path_factory.mktemp("compose-data")
    with postgres_database(migrate=False) as url:
        yield {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
            "DATABASE_URL": url,
            "BROKER_URL": flushed_redis_url(),
            "OPERATOR_KEY": OPERATOR_KEY,
            "DATA_DIR": str(data_dir),
            "ADAPTER_DIR": str(data_dir / "adapters"),
            "BASE_MODEL": str(model_dir()),
            "INFERENCE_BACKEND": "local",
            "LOG_JSON": "true",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            # the gate on its 2 first questions and prompts, as in the other worker tests
            "GATE_MC_LIMIT": "2",
            "GATE_PROMPT_LIMIT": "2",
            "METRICS_REQUIRE_OPERATOR_KEY": str(
                _compose_services()["api"]["environment"]["METRICS_REQUIRE_OPERATOR_KEY"]
            ).lower(),  # YAML reads the compose default `true` as a boolean
        }


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        _local(command),
        cwd=REPO_ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(predicate: Any, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen; log:\n{log.read_text()[-3000:]}")


def test_migrate_then_api_then_workers_and_beat(env: dict[str, str], tmp_path: Path) -> None:
    services = _compose_services()
    migrate = subprocess.run(
        _local(services["migrate"]["command"]),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr

    port = free_port()
    api_env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        api_log = tmp_path / "api.log"
        procs.append(_start(services["api"]["command"], api_env, api_log))
        base = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _ok(f"{base}/healthz"), 60, "api /healthz", api_log)
        logs = {}
        for name in ("worker", "ops-worker", "beat"):
            logs[name] = tmp_path / f"{name}.log"
            procs.append(_start(services[name]["command"], env, logs[name]))
        for name, node in (("worker", "gpu@"), ("ops-worker", "default@")):
            _wait_for(
                lambda node=node: _pinged(node, env), 90, f"{name} answering ping", logs[name]
            )
        _wait_for(
            lambda: "beat: Starting" in logs["beat"].read_text(), 60, "beat start", logs["beat"]
        )
        ready = httpx.get(f"{base}/readyz", timeout=30).json()
        assert ready["checks"]["database"]["ok"] and ready["checks"]["broker"]["ok"], ready
        _train_through_the_stack(base, logs["worker"])
        _generate_and_scrape(base)
        line = api_log.read_text().splitlines()[-1]
        assert line.startswith("{") and "request_id" in line  # JSON logs with request ids
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _train_through_the_stack(base: str, worker_log: Path) -> None:
    """Feedback -> train on the compose worker; its logs carry the API request's id."""
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    assert httpx.post(f"{base}/users", json={"id": "compose"}, headers=operator).status_code == 201
    pairs = [
        {"prompt": f"Question {i}?", "chosen": f"A kind answer {i}.", "rejected": "No."}
        for i in range(4)
    ]
    stored = httpx.post(f"{base}/users/compose/feedback", json={"pairs": pairs}, headers=operator)
    assert stored.status_code == 201
    started = httpx.post(
        f"{base}/users/compose/train",
        json={"hyperparameters": TINY_TRAINING},
        headers={**operator, "X-Request-ID": "compose-request-1"},
    )
    assert started.status_code == 202, started.text
    job_url = f"{base}/users/compose/train/jobs/{started.json()['id']}"

    def finished() -> bool:
        return httpx.get(job_url, headers=operator).json()["status"] in ("succeeded", "failed")

    _wait_for(finished, 300, "the training job to finish", worker_log)
    job = httpx.get(job_url, headers=operator).json()
    assert job["status"] == "succeeded", job
    assert "compose-request-1" in worker_log.read_text()


def _generate_and_scrape(base: str) -> None:
    """After feedback -> train -> generate, /metrics shows each part."""
    operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    body = {"prompt": "Hello?", "max_tokens": 4, "temperature": 0}
    answer = httpx.post(f"{base}/users/compose/generate", json=body, headers=operator, timeout=120)
    assert answer.status_code == 200 and answer.json()["adapter_version"] == 1, answer.text
    streamed = httpx.post(
        f"{base}/users/compose/generate",
        json={**body, "stream": True},
        headers=operator,
        timeout=120,
    )
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert httpx.get(f"{base}/metrics").status_code == 401  # compose: the operator key only
    text = httpx.get(f"{base}/metrics", headers=operator).text
    for needle in (
        "bapo_feedback_pairs_stored_total 4.0",
        'bapo_training_jobs{status="succeeded"} 1.0',
        "bapo_training_last_duration_seconds",
        "bapo_training_last_tokens_per_second",
        'bapo_adapter_loads_total{backend="local"} 1.0',
        'bapo_generate_tokens_per_second_count{backend="local"} 2.0',
        'bapo_generate_time_to_first_token_seconds_count{backend="local"} 1.0',
        'route="/users/{user_id}/generate",status="200"',
    ):
        assert needle in text, needle


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _pinged(node: str, env: dict[str, str]) -> bool:
    done = subprocess.run(
        [str(BIN / "celery"), "-A", "worker.celery_app", "inspect", "ping", "--timeout", "3"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return node in done.stdout


def _healthcheck(service: dict[str, Any], env: dict[str, str]) -> tuple[int, str]:
    """Run a service's CMD-SHELL health check as docker would: (exit code, output)."""
    kind, shell = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    done = subprocess.run(
        ["sh", "-c", shell.replace("$$", "$")],  # compose's `$$` is a literal `$` in the container
        cwd=REPO_ROOT,
        env={**env, "PATH": f"{BIN}:{env['PATH']}", "HOSTNAME": socket.gethostname()},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_worker_healthchecks_ping_their_own_node(env: dict[str, str], tmp_path: Path) -> None:
    """With only the ops worker up, its check passes and the GPU worker's fails (no node of its)."""
    services = _compose_services()
    log = tmp_path / "ops-worker.log"
    proc = _start(services["ops-worker"]["command"], env, log)
    try:
        _wait_for(lambda: _pinged("default@", env), 90, "ops-worker answering ping", log)
        code, output = _healthcheck(services["ops-worker"], env)
        assert code == 0 and "default@" in output, output
        code, output = _healthcheck(services["worker"], env)  # a bare `inspect ping` would pass
        assert code != 0 and "No nodes replied" in output, output
    finally:
        _stop(proc)


def test_celery_executable_exists() -> None:
    assert shutil.which(str(BIN / "celery")) and shutil.which(str(BIN / "alembic"))


@pytest.mark.parametrize(
    "signalled",
    [
        "main",  # `docker stop`: SIGTERM to the container's PID 1, the Celery main process
        "group",  # systemd (KillMode=control-group), a terminal: every process of the worker
    ],
)
def test_sigterm_to_the_compose_worker_requeues_its_job_at_once_without_using_an_attempt(
    signalled: str, tmp_path: Path
) -> None:
    """The compose `worker` command (prefork pool: the job runs in a child process) stopped
    mid-training: the job goes back to the queue within seconds (not after the reaper's
    JOB_STALE_AFTER_S), keeps its attempts, and the next worker finishes it."""
    command = _compose_services()["worker"]["command"]
    with postgres_database() as url, private_redis() as broker:
        settings = make_settings(
            tmp_path,
            url,
            broker_url=broker.url,
            base_model=str(model_dir()),
            gate_mc_limit=2,
            gate_prompt_limit=2,
            job_heartbeat_s=1.0,
            job_stale_after_s=600,  # no reaper runs here anyway: a requeue is the worker's own
        )
        env = settings_env(settings)
        engine = make_engine(settings)
        factory = make_sessionmaker(engine)
        job_id = _queued_job(factory, settings, "sigterm")
        logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
        first = _start(command, env, logs[0])
        try:
            _wait_for(lambda: _job(factory, job_id).progress > 0, 300, "a step", logs[0])
            signalled_at = time.monotonic()
            if signalled == "group":
                os.killpg(first.pid, signal.SIGTERM)
            else:
                first.terminate()
            _wait_for(lambda: _job(factory, job_id).status != "running", 60, "the stop", logs[0])
            requeue_s = time.monotonic() - signalled_at
            job = _job(factory, job_id)
            assert (job.status, job.attempts, job.phase) == ("queued", 0, "requeued")
            assert _status_messages(factory, job_id)[-1] == "worker shutting down"
            assert first.wait(timeout=60) == 0  # the warm shutdown completed
        finally:
            _stop(first)
        assert version_folders(settings.adapters_path, "sigterm") == []
        second = _start(command, env, logs[1])
        try:
            started = time.monotonic()
            _wait_for(
                lambda: _job(factory, job_id).status in ("succeeded", "failed"),
                600,
                "the next worker to finish the job",
                logs[1],
            )
            rerun_s = time.monotonic() - started
        finally:
            _stop(second)
        job = _job(factory, job_id)
        engine.dispose()
        assert (job.status, job.attempts, job.adapter_version) == ("succeeded", 1, 1), job.error
    _record(signalled, {"requeued_after_sigterm_s": requeue_s, "next_worker_run_s": rerun_s})


def _queued_job(factory: sessionmaker[Session], settings: Any, user_id: str) -> str:
    """A user with 4 pairs and a queued job for them (its message sent after commit)."""
    with transaction(factory) as session:
        session.add(User(id=user_id))
        session.flush()
        pairs = [
            Pair([{"role": "user", "content": f"Question {i}?"}], f"Kind {i}.", "No.", None)
            for i in range(4)
        ]
        store_pairs(session, user_id, pairs, None)
        job, _ = job_service.start_job(
            session, settings, user_id, hyperparameters=STOPPABLE_TRAINING
        )
        return job.id


def _job(factory: sessionmaker[Session], job_id: str) -> TrainingJob:
    with transaction(factory) as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _status_messages(factory: sessionmaker[Session], job_id: str) -> list[str]:
    with transaction(factory) as session:
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.kind == "status")
            .order_by(JobEvent.id)
        )
        return [str(row.data.get("message")) for row in rows]


def _record(name: str, figures: dict[str, float]) -> None:
    ARTIFACT.parent.mkdir(exist_ok=True)
    recorded = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    recorded[name] = {k: round(v, 1) for k, v in figures.items()}
    ARTIFACT.write_text(json.dumps(recorded, indent=2))
    print(name, recorded[name])
