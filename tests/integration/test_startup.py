"""Start-up rules: migrations, the un-migrated refusal, embedded defaults."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect

from app.api.state import app_state
from app.core.db import upgrade_to_head
from app.main import NotMigratedError, create_app, prepare_database
from tests.support import LiveServer, make_settings, postgres_database
from tests.worker_support import api_process


def test_unmigrated_postgres_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with postgres_database(migrate=False) as url:
        settings = make_settings(tmp_path, url)
        assert settings.auto_migrate is False
        app = create_app(settings)
        with pytest.raises(NotMigratedError, match="alembic upgrade head"):
            prepare_database(settings, app)
        app_state(app).engine.dispose()


def test_server_process_exits_on_unmigrated_postgres(tmp_path: Path) -> None:
    with postgres_database(migrate=False) as url:
        env = {
            "DATABASE_URL": url,
            "DATA_DIR": str(tmp_path),
            "PORT": "0",
            "LOG_JSON": "false",
            "PATH": "/usr/bin:/bin",
            "OPERATOR_KEY": "test-operator-key-0123456789",
        }
        done = subprocess.run(
            [sys.executable, "-m", "app"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0
        assert "alembic upgrade head" in done.stderr


def test_migrations_create_the_schema_on_postgres(tmp_path: Path) -> None:
    with postgres_database(migrate=False) as url:
        upgrade_to_head(url)
        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        engine.dispose()
    assert {
        "users",
        "api_keys",
        "preference_pairs",
        "idempotency_records",
        "alembic_version",
    } <= tables


def test_embedded_defaults_use_sqlite_and_migrate_themselves(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    assert settings.database_url.startswith("sqlite:///")
    server = LiveServer(settings).start()
    try:
        assert httpx.get(f"{server.url}/readyz").json()["checks"]["database"]["ok"] is True
        assert (tmp_path / "data" / "bapo.sqlite3").exists()
    finally:
        server.stop()


def test_operator_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, operator_key=None)
    first = app_state(create_app(settings)).operator_key
    second = app_state(create_app(settings)).operator_key
    assert first == second and len(first) > 30
    assert (tmp_path / "operator_key").stat().st_mode & 0o777 == 0o600


def test_idle_connections_close_after_the_keep_alive_timeout(tmp_path: Path) -> None:
    """KEEP_ALIVE_TIMEOUT_S reaches uvicorn: with 1 s, a connection idle for 2.5 s is closed by
    the server (with uvicorn's default of 5 s it would still be open)."""
    settings = make_settings(tmp_path, keep_alive_timeout_s=1)
    with api_process(settings, tmp_path / "api.log") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert _read_response(conn).startswith(b"HTTP/1.1 200")
            time.sleep(2.5)
            conn.settimeout(2)
            assert conn.recv(65536) == b""  # closed by the server, not timed out


def _read_response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length (headers and body may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed before the headers ended: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, f"closed before the body ended: {body!r}"
        body += chunk
    return head + b"\r\n\r\n" + body
