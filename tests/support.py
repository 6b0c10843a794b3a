"""Test helpers shared by the suites: databases, a live uvicorn server, an API client."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import create_engine, text

from app.api.state import app_state
from app.core.config import Settings
from app.core.db import upgrade_to_head
from app.main import create_app

OPERATOR_KEY = "test-operator-key-0123456789"
PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TABLES = (
    "feedback_imports",
    "file_chunks",
    "files",
    "adapter_version_floors",
    "job_events",
    "training_jobs",
    "adapters",
    "idempotency_records",
    "preference_pairs",
    "api_keys",
    "users",
    "base_responses",
    "reference_logprobs",
)


@contextmanager
def postgres_database(migrate: bool = True) -> Iterator[str]:
    """A fresh Postgres database (migrated with `alembic upgrade head` unless told not to)."""
    name = f"bapo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        if migrate:
            upgrade_to_head(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_settings(data_dir: Path, database_url: str = "", **overrides: Any) -> Settings:
    """Settings for a test: a private data folder, the test operator key, JSON logs off."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "operator_key": OPERATOR_KEY,
        "log_json": False,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """The real app on a real uvicorn server in a background thread."""

    settings: Settings
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def wipe(self) -> None:
        """Delete every row, so the next test starts from an empty (migrated) database."""
        with app_state(self.app).engine.begin() as conn:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))


class Api:
    """An httpx client for the live server, with helpers for keys and users."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=60)
        self.operator = {"Authorization": f"Bearer {OPERATOR_KEY}"}

    def create_user(self, user_id: str | None = None) -> tuple[str, dict[str, str]]:
        """Create a user as the operator; returns (id, that user's auth headers)."""
        body = {"id": user_id} if user_id else {}
        response = self.http.post("/users", json=body, headers=self.operator)
        assert response.status_code == 201, response.text
        data = response.json()
        return data["id"], {"Authorization": f"Bearer {data['api_key']}"}

    def close(self) -> None:
        self.http.close()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the one error shape, the status, and (optionally) the code; return the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"type", "message", "code"} <= set(error), error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)
