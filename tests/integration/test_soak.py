"""A bounded soak on loopback: many users, feedback posts retried under Idempotency-Keys (some
concurrently), and reads; afterwards the database holds exactly the acknowledged pairs.

On a private Postgres (tests/fault_support.py), so the shared server's other users are not loaded.
Figures go to test-artifacts/soak.json. SOAK_SECONDS overrides the 60 s of load.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.core.db import upgrade_to_head
from tests.fault_support import count_rows, private_postgres
from tests.support import Api, LiveServer, assert_error, make_settings

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
USERS = 24
CLIENTS = 8
ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "soak.json"

pytestmark = pytest.mark.slow


@pytest.fixture
def soak_server(tmp_path: Path) -> Iterator[LiveServer]:
    with private_postgres() as pg:
        upgrade_to_head(pg.url)
        server = LiveServer(make_settings(tmp_path, pg.url)).start()
        try:
            yield server
        finally:
            server.stop()


class Ledger:
    """What the clients saw: latencies, statuses, and the pair id each key was acknowledged with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.statuses: dict[int, int] = {}
        self.acked: dict[str, int] = {}  # idempotency key -> pair id
        self.mismatches: list[str] = []
        self.bad: list[str] = []

    def record(self, kind: str, response: httpx.Response, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1

    def ack(self, key: str, pair_id: int) -> None:
        with self.lock:
            seen = self.acked.setdefault(key, pair_id)
            if seen != pair_id:
                self.mismatches.append(f"{key}: {seen} != {pair_id}")


class Client:
    """One simulated client thread's behaviour."""

    def __init__(self, base_url: str, users: list[tuple[str, dict[str, str]]], ledger: Ledger):
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.users, self.ledger = users, ledger
        self.rng = random.Random()

    def _send(self, kind: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        started = time.monotonic()
        response = self.http.request(method, path, **kwargs)  # type: ignore[arg-type]
        self.ledger.record(kind, response, time.monotonic() - started)
        return response

    def post_pair(self, user_id: str, auth: dict[str, str], key: str) -> bool:
        body = {"prompt": f"p {key}", "chosen": "good", "rejected": "bad"}
        headers = {**auth, "Idempotency-Key": key}
        response = self._send(
            "feedback_post", "POST", f"/users/{user_id}/feedback", json=body, headers=headers
        )
        if response.status_code == 201:
            self.ledger.ack(key, int(response.json()["pairs"][0]["id"]))
            return True
        if response.status_code not in (409, 503):
            self.ledger.bad.append(f"{response.status_code} {response.text[:200]}")
        else:
            assert_error(response, response.status_code)
        return False

    def step(self, pool: ThreadPoolExecutor) -> None:
        user_id, auth = self.rng.choice(self.users)
        roll = self.rng.random()
        if roll < 0.55:
            key = uuid.uuid4().hex
            if roll < 0.15:  # the same key twice at once (a client retrying too early)
                twin = pool.submit(self.post_pair, user_id, auth, key)
                self._until_acked(user_id, auth, key)
                twin.result()
            else:
                self._until_acked(user_id, auth, key)
            if roll < 0.30:  # a late retry of an acknowledged request: replayed, not stored
                self.post_pair(user_id, auth, key)
        elif roll < 0.85:
            self._send("feedback_list", "GET", f"/users/{user_id}/feedback", headers=auth)
        else:
            self._send("user_get", "GET", f"/users/{user_id}", headers=auth)

    def _until_acked(self, user_id: str, auth: dict[str, str], key: str) -> None:
        for _ in range(50):
            if self.post_pair(user_id, auth, key):
                return
            time.sleep(0.05)
        self.ledger.bad.append(f"key {key} never acknowledged")


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "count": len(ordered),
        "p50_ms": round(pick(0.5) * 1e3, 1),
        "p95_ms": round(pick(0.95) * 1e3, 1),
        "p99_ms": round(pick(0.99) * 1e3, 1),
        "max_ms": round(ordered[-1] * 1e3, 1),
    }


def test_soak_stores_exactly_the_acknowledged_pairs(soak_server: LiveServer) -> None:
    api = Api(soak_server.url)
    users = [api.create_user(f"soak{i:02d}") for i in range(USERS)]
    ledger = Ledger()
    deadline = time.monotonic() + SOAK_SECONDS

    def client_loop() -> None:
        client = Client(soak_server.url, users, ledger)
        with ThreadPoolExecutor(1) as pool:
            while time.monotonic() < deadline:
                client.step(pool)

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as clients:
        for future in [clients.submit(client_loop) for _ in range(CLIENTS)]:
            future.result()
    elapsed = time.monotonic() - started

    total = sum(ledger.statuses.values())
    errors = sum(n for status, n in ledger.statuses.items() if status >= 500)
    report = {
        "seconds": round(elapsed, 1),
        "users": USERS,
        "clients": CLIENTS,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(ledger.statuses.items())},
        "error_rate_5xx": errors / total,
        "acknowledged_pairs": len(ledger.acked),
        "latency": {kind: _percentiles(v) for kind, v in ledger.latencies.items()},
    }
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    assert ledger.bad == [] and ledger.mismatches == []
    assert errors == 0 and len(ledger.acked) > 50
    stored = count_rows(soak_server.settings.database_url, "preference_pairs")
    assert stored == len(ledger.acked)  # every acknowledged pair, and no duplicate
    assert len(set(ledger.acked.values())) == len(ledger.acked)
    per_user = sum(api.http.get(f"/users/{u}", headers=a).json()["pair_count"] for u, a in users)
    assert per_user == stored
    api.close()
