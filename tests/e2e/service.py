"""The whole service as `make run` starts it (`python -m app.embedded`), on a free port.

Embedded defaults: SQLite database and SQLite Celery broker in a temporary DATA_DIR, a real Celery
worker and beat, the in-process inference backend with the bundled model. Only sizes are turned
down (tiny training defaults, a short retention check) so a run fits in a test; the retention gate
is opened wide so whether v<N> becomes active does not depend on a 135M model's luck.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import OPERATOR_KEY, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 40
# Small enough that a job takes seconds on 2 CPU cores; the page can still override each of them.
TINY_TRAINING = {
    "epochs": 1,
    "max_steps": 2,
    "batch_size": 2,
    "lora_rank": 8,
    "lora_alpha": 16,
    "base_max_new_tokens": 8,
    "max_prompt_tokens": 64,
    "max_response_tokens": 32,
}


def model_dir() -> Path:
    """The bundled model converted once per machine (BAPO_TEST_DATA_DIR or the repo's data/)."""
    from foundation.model import prepare_base_model

    cache = Path(os.environ.get("BAPO_TEST_DATA_DIR") or REPO_ROOT / "data")
    return prepare_base_model(cache)


def service_env(data_dir: Path, port: int) -> dict[str, str]:
    """The environment of the embedded service under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "BROKER_"))}
    env.update(
        DATA_DIR=str(data_dir),
        HOST="127.0.0.1",
        PORT=str(port),
        OPERATOR_KEY=OPERATOR_KEY,
        BASE_MODEL=str(model_dir()),
        INFERENCE_BACKEND="local",
        LOG_JSON="false",
        LOG_LEVEL="WARNING",
        TRAIN_DEFAULTS=json.dumps(TINY_TRAINING),
        GATE_MC_LIMIT="4",
        GATE_PROMPT_LIMIT="2",
        GATE_MIN_RETENTION_DELTA="-1",
        GATE_MAX_DEGENERATE_INCREASE="1",
        GATE_MAX_ANCHOR_DRIFT="-1000",
        RETRAIN_INTERVAL_S="3600",
        PYTHONUNBUFFERED="1",
    )
    for name in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "ADAPTER_DIR", "VLLM_URL"):
        env.pop(name, None)
    return env


@dataclass
class EmbeddedService:
    """`python -m app.embedded` as a child process, with its output in DATA_DIR/service.log."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "service.log"

    def start(self) -> EmbeddedService:
        """Start it and wait until /readyz answers 200."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.embedded"],
                cwd=REPO_ROOT,
                env=service_env(self.data_dir, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the service exited at start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the service was not ready in {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (the supervisor stops its children), then SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the service's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ServiceApi:
    """Direct API calls for arranging and checking what the browser did."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=120)
        self.operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}

    def create_user(self, user_id: str) -> str:
        """Create a user; return its API key."""
        response = self.http.post("/users", json={"id": user_id}, headers=self.operator)
        assert response.status_code == 201, response.text
        return str(response.json()["api_key"])

    def user(self, user_id: str) -> dict[str, Any]:
        """The user's summary (pair_count, active_adapter_version)."""
        response = self.http.get(f"/users/{user_id}", headers=self.operator)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def pairs(self, user_id: str) -> list[dict[str, Any]]:
        """The user's newest pairs, newest first."""
        response = self.http.get(f"/users/{user_id}/feedback", headers=self.operator)
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    def add_pairs(self, user_id: str, pairs: list[dict[str, Any]]) -> None:
        """Store pairs as the operator."""
        response = self.http.post(
            f"/users/{user_id}/feedback", json={"pairs": pairs}, headers=self.operator
        )
        assert response.status_code == 201, response.text

    def jobs(self, user_id: str) -> list[dict[str, Any]]:
        """The user's training jobs, newest first."""
        response = self.http.get(f"/users/{user_id}/train/jobs", headers=self.operator)
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    def adapters(self, user_id: str) -> list[dict[str, Any]]:
        """The user's adapter versions."""
        response = self.http.get(f"/users/{user_id}/adapters", headers=self.operator)
        assert response.status_code == 200, response.text
        body = response.json()
        return list(body["data"] if isinstance(body, dict) else body)

    def close(self) -> None:
        self.http.close()
