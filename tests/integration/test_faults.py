"""Faults on PRIVATE servers: Postgres restarted under load, Redis stopped and back.

Both use throwaway servers from tests/fault_support.py, never the shared 5432/6379 ones.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from app.api.state import app_state
from app.core.db import transaction, upgrade_to_head
from app.models import utcnow
from app.services.schedule import reap_stale_jobs
from tests.fault_support import PrivatePostgres, PrivateRedis, count_rows, private_postgres
from tests.fault_support import private_redis as start_private_redis
from tests.support import Api, LiveServer, assert_error, make_settings

PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
WRITERS = 4
MAX_REQUEST_S = 10.0  # a request slower than this during the outage counts as a hang


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, LiveServer]]:
    with private_postgres() as pg:
        upgrade_to_head(pg.url)
        server = LiveServer(make_settings(tmp_path, pg.url, rate_limit_generate_per_min=0)).start()
        try:
            yield pg, server
        finally:
            server.stop()


class Writer(threading.Thread):
    """Posts pairs, each under its own Idempotency-Key, retrying a 503 under the same key."""

    def __init__(self, base_url: str, user_id: str, auth: dict[str, str], stop: threading.Event):
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=base_url, timeout=MAX_REQUEST_S * 3)
        self.path, self.auth, self.stop = f"/users/{user_id}/feedback", auth, stop
        self.acked: dict[str, int] = {}  # idempotency key -> pair id
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.slowest = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            key = uuid.uuid4().hex
            for _ in range(200):  # retry under the same key until acknowledged
                if self._post(key):
                    break
                time.sleep(0.1)

    def _post(self, key: str) -> bool:
        started = time.monotonic()
        response = self.http.post(
            self.path, json=PAIR, headers={**self.auth, "Idempotency-Key": key}
        )
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.statuses.append(response.status_code)
        if response.status_code == 201:
            self.acked[key] = int(response.json()["pairs"][0]["id"])
            return True
        try:
            assert_error(response, 503, "database_unavailable")
        except AssertionError as exc:
            self.errors.append(str(exc)[:300])
        return False


def test_postgres_restart_under_load_answers_503_and_loses_nothing(
    pg_server: tuple[PrivatePostgres, LiveServer],
) -> None:
    pg, server = pg_server
    api = Api(server.url)
    user_id, auth = api.create_user("writer")
    stop = threading.Event()
    writers = [Writer(server.url, user_id, auth, stop) for _ in range(WRITERS)]
    for writer in writers:
        writer.start()
    time.sleep(1.0)
    pg.stop()
    time.sleep(2.0)  # writers keep posting into the outage
    outage = api.http.get(f"/users/{user_id}", headers=auth)
    assert_error(outage, 503, "database_unavailable")
    assert outage.headers["Retry-After"]
    pg.start()
    time.sleep(2.0)
    stop.set()
    for writer in writers:
        writer.join(timeout=60)
        assert not writer.is_alive()
    statuses = [s for w in writers for s in w.statuses]
    acked = {k: v for w in writers for k, v in w.acked.items()}
    assert [e for w in writers for e in w.errors] == []  # every refusal a 503 in the error shape
    assert 503 in statuses and statuses.count(201) == len(acked) > 10
    assert max(w.slowest for w in writers) < MAX_REQUEST_S  # refused promptly, never hung
    listed = api.http.get(f"/users/{user_id}", headers=auth)
    for _ in range(25):  # recovers by itself (at most a stale pooled connection or two)
        if listed.status_code == 200:
            break
        time.sleep(0.2)
        listed = api.http.get(f"/users/{user_id}", headers=auth)
    assert listed.status_code == 200, listed.text
    assert listed.json()["pair_count"] == len(acked) == count_rows(pg.url, "preference_pairs")
    assert len(set(acked.values())) == len(acked)  # one pair per key: no duplicate
    api.close()


def test_redis_down_train_still_answers_and_is_resent(tmp_path: Path) -> None:
    with start_private_redis() as redis_server:
        settings = make_settings(tmp_path, broker_url=redis_server.url, job_resend_after_s=10)
        server = LiveServer(settings).start()
        api = Api(server.url)
        try:
            _check_redis_outage(api, server, redis_server)
        finally:
            api.close()
            server.stop()


def _check_redis_outage(api: Api, server: LiveServer, redis_server: PrivateRedis) -> None:
    user_id, auth = api.create_user("trainer")
    batch = {"pairs": [PAIR] * 4}
    assert api.http.post(f"/users/{user_id}/feedback", json=batch, headers=auth).is_success
    assert api.http.get("/readyz").status_code == 200
    redis_server.stop()
    ready = api.http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["broker"]["ok"] is False
    started = time.monotonic()
    job = api.http.post(f"/users/{user_id}/train", headers=auth)
    assert job.status_code == 202, job.text
    assert time.monotonic() - started < MAX_REQUEST_S
    job_id = job.json()["id"]
    assert job.json()["status"] == "queued"
    redis_server.start()  # same port, empty: the message sent during the outage is gone
    deadline = time.monotonic() + 10
    while api.http.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "readyz did not recover"
        time.sleep(0.2)
    later = utcnow() + timedelta(seconds=server.settings.job_resend_after_s + 1)
    with transaction(app_state(server.app).session_factory) as session:
        report = reap_stale_jobs(session, server.settings, now=later)
    assert report.resent == [job_id]
    import redis

    assert redis.Redis(port=redis_server.port).llen("gpu") == 1  # the re-sent message
    still = api.http.get(f"/users/{user_id}/train/jobs/{job_id}", headers=auth)
    assert still.json()["status"] == "queued"
