"""Helpers for the training-job tests: real Celery worker processes, tiny trainings, polling.

Workers are real `celery -A worker.celery_app worker` subprocesses configured by environment
variables (the same settings the API object gets); no eager mode anywhere.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

from app.core.config import Settings
from tests.support import (
    OPERATOR_KEY,
    Api,
    LiveServer,
    free_port,
    make_settings,
    postgres_database,
)

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
BAPO = str(REPO_ROOT / ".venv" / "bin" / "bapo")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
WORKER_READY_TIMEOUT_S = 90.0

# A training of a few seconds on the bundled model: 2 optimizer steps over 4 short pairs.
TINY_TRAINING: dict[str, Any] = {
    "max_steps": 2,
    "batch_size": 2,
    "lora_rank": 8,
    "max_prompt_tokens": 32,
    "max_response_tokens": 16,
    "base_max_new_tokens": 8,
    "target_modules": ["q_proj", "v_proj"],
}
# The same, but long enough to be cancelled or killed in the middle of its steps.
LONG_TRAINING: dict[str, Any] = {"max_steps": 200}
# Settings of the job stacks: tiny trainings, a fast heartbeat and reaper, two attempts per job.
STACK_SETTINGS: dict[str, Any] = {
    "train_defaults": TINY_TRAINING,
    "gate_mc_limit": 2,
    "gate_prompt_limit": 2,
    "job_heartbeat_s": 0.5,
    "job_stale_after_s": 6,
    "reaper_interval_s": 1,
    "job_max_attempts": 2,
    "retrain_interval_s": 5,
    "retrain_min_new_pairs": 6,  # the other tests' users (4 pairs) are never due
}
JOB_TIMEOUT_S = 240.0


def model_dir() -> Path:
    """The bundled model folder (converted once into the repository's data/ if needed)."""
    from foundation.model import prepare_base_model

    return prepare_base_model(Path(os.environ.get("BAPO_TEST_DATA_DIR") or REPO_ROOT / "data"))


def flushed_redis_url() -> str:
    """The test Redis database, emptied (it holds only this suite's queues)."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    return TEST_REDIS_URL


@contextmanager
def operator_env(data_dir: Path, **extra: str) -> Iterator[dict[str, str]]:
    """Service settings for the `bapo` CLI: a fresh migrated Postgres database, the test Redis."""
    with postgres_database() as url:
        yield {
            **os.environ,
            "DATABASE_URL": url,
            "BROKER_URL": flushed_redis_url(),
            "DATA_DIR": str(data_dir),
            "LOG_JSON": "false",
            **extra,
        }


def run_bapo(env: dict[str, str], *args: str, ok: bool = True) -> Any:
    """Run the installed `bapo` command; with `ok`, expect success and return its parsed output."""
    done = subprocess.run(
        [BAPO, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if ok:
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout.startswith(("{", "[")) else done.stdout
    return done


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a child process that reproduces these settings (plus test-friendly knobs)."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in _setting_names()}
    for name, value in settings.model_dump(exclude_none=True).items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[name.upper()] = value if isinstance(value, str) else _env_value(value)
    env.update(
        {
            "OPERATOR_KEY": OPERATOR_KEY,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def _setting_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def _env_value(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@dataclass
class WorkerProcess:
    """One `celery worker` subprocess, logging to a file."""

    env: dict[str, str]
    queues: str
    log_path: Path
    beat: bool = False
    name: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start it and wait until Celery says it is ready."""
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            self.queues,
            "--pool",
            "solo",
            "-n",
            f"{self.name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            *(["--beat"] if self.beat else []),
        ]
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(
            lambda: " ready." in self.log() or self._died(),
            WORKER_READY_TIMEOUT_S,
            f"worker {self.name} ready",
        )
        assert not self._died(), self.log()
        return self

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        """What this worker wrote so far."""
        return self.log_path.read_bytes()[self.offset :].decode("utf-8", "replace")

    def kill(self) -> None:
        """kill -9: no shutdown code runs, the message stays unacknowledged."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 60) -> None:
        """Warm shutdown (SIGTERM); kill if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@contextmanager
def file_size_limit(pid: int, limit: int) -> Iterator[None]:
    """While the block runs, no file the process writes can grow past `limit` bytes.

    RLIMIT_FSIZE (its soft limit, set from outside with prlimit) binds root too; Python ignores
    SIGXFSZ, so the write(2) that would cross the limit fails with EFBIG, as it would with ENOSPC
    on a full disk.
    """
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def post_pairs(
    http: httpx.Client, user_id: str, headers: dict[str, str], count: int = 4, topic: str = "colour"
) -> None:
    """Store `count` short preference pairs (same prompts in every test: the caches warm up)."""
    pairs = [
        {
            "prompt": f"Name a {topic}, {i}.",
            "chosen": f"Arr, {topic} {i}, matey!",
            "rejected": f"The {topic} is {i}.",
        }
        for i in range(count)
    ]
    response = http.post(f"/users/{user_id}/feedback", json={"pairs": pairs}, headers=headers)
    assert response.status_code == 201, response.text


def get_job(
    http: httpx.Client, user_id: str, job_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    """GET the job (must succeed)."""
    response = http.get(f"/users/{user_id}/train/jobs/{job_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def events(
    http: httpx.Client, user_id: str, job_id: str, headers: dict[str, str], kind: str | None = None
) -> list[dict[str, Any]]:
    """Every event of the job (follows the pages)."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100, **({"kind": kind} if kind else {})}
    while True:
        response = http.get(
            f"/users/{user_id}/train/jobs/{job_id}/events", params=params, headers=headers
        )
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["data"]
        if not page["has_more"]:
            return found
        params["after"] = page["next_cursor"]


def wait_status(
    http: httpx.Client,
    user_id: str,
    job_id: str,
    headers: dict[str, str],
    statuses: set[str],
    timeout: float,
) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses`."""
    return wait_for(
        lambda: (job := get_job(http, user_id, job_id, headers))["status"] in statuses and job,
        timeout,
        f"job {job_id} to reach {statuses}",
    )


def version_folders(adapters_path: Path, user_id: str) -> list[str]:
    """Names of the user's visible adapter folders (`v<N>`), hidden staging folders excluded."""
    folder = adapters_path / user_id
    return (
        sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if folder.is_dir()
        else []
    )


def hidden_entries(adapters_path: Path, user_id: str) -> list[str]:
    """Names of hidden (staging/temp) entries in the user's adapter folder."""
    folder = adapters_path / user_id
    return (
        sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
        if folder.is_dir()
        else []
    )


@dataclass
class Stack:
    """API + Postgres + Redis + a `gpu` training worker + a `default` worker with beat (reaper)."""

    server: LiveServer
    settings: Settings
    env: dict[str, str]
    log_dir: Path
    gpu: WorkerProcess
    default: WorkerProcess
    api: Api = field(init=False)

    def __post_init__(self) -> None:
        self.api = Api(self.server.url)

    def start_gpu_worker(self) -> WorkerProcess:
        """A fresh training worker (after the previous one was killed)."""
        self.gpu = WorkerProcess(self.env, "gpu", self.log_dir / "gpu.log").start()
        return self.gpu

    def ensure_gpu_worker(self) -> None:
        """Restart the training worker if a test killed it."""
        if self.gpu.process is None or self.gpu.process.poll() is not None:
            self.start_gpu_worker()


@contextmanager
def job_stack(data_dir: Path, broker_url: str | None = None, **extra_env: str) -> Iterator[Stack]:
    """The whole service on a fresh Postgres database + the test Redis (or `broker_url`, e.g. a
    private Redis), with real workers; extra_env goes to the workers only."""
    with postgres_database() as url:
        settings = make_settings(
            data_dir,
            url,
            broker_url=broker_url or flushed_redis_url(),
            base_model=str(model_dir()),
            **STACK_SETTINGS,
        )
        server = LiveServer(settings).start()
        env = settings_env(settings, **extra_env)
        default = WorkerProcess(env, "default", data_dir / "default.log", beat=True).start()
        gpu = WorkerProcess(env, "gpu", data_dir / "gpu.log").start()
        stack = Stack(server, settings, env, data_dir, gpu, default)
        try:
            yield stack
        finally:
            stack.api.close()
            stack.gpu.stop()
            stack.default.stop()
            server.stop()
            flushed_redis_url()


def train_and_wait(http: httpx.Client, user_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """POST /train (must create a job) and wait until the job ends."""
    response = http.post(f"/users/{user_id}/train", json={}, headers=headers)
    assert response.status_code == 202, response.text
    ends = {"succeeded", "failed", "cancelled"}
    return wait_status(http, user_id, response.json()["id"], headers, ends, JOB_TIMEOUT_S)


def adapter_listing(http: httpx.Client, user_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """GET /users/{id}/adapters (must succeed)."""
    response = http.get(f"/users/{user_id}/adapters", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cache_lookups(http: httpx.Client) -> dict[tuple[str, str], float]:
    """(cache, result) -> bapo_training_cache_lookups_total, scraped with the operator key."""
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert response.status_code == 200, response.text
    return {
        (sample.labels["cache"], sample.labels["result"]): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "bapo_training_cache_lookups_total"
    }


@contextmanager
def api_process(settings: Settings, log: Path) -> Iterator[str]:
    """`python -m app` (the production entry point) on its own port; yields its base URL."""
    port = free_port()
    env = settings_env(settings, HOST="127.0.0.1", PORT=str(port))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO_ROOT, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url) or process.poll() is not None, 60, f"API on {port}")
        assert process.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
