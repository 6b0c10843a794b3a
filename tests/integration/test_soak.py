"""A bounded soak on loopback: many users, feedback posts retried under Idempotency-Keys (some
concurrently), reads, generate requests (the in-process backend) and training triggers run by a
real Celery worker; afterwards the database holds exactly the acknowledged pairs and every job
ends (succeeded, one at a time per user).

On a private Postgres and Redis (tests/fault_support.py), so the shared servers are not loaded.
Figures go to test-artifacts/soak.json. SOAK_SECONDS overrides the 60 s of load.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.core.db import upgrade_to_head
from foundation.stats import quantile
from tests.fault_support import count_rows, private_postgres, private_redis
from tests.support import Api, LiveServer, assert_error, make_settings
from tests.worker_support import (
    TINY_TRAINING,
    WorkerProcess,
    model_dir,
    post_pairs,
    settings_env,
    wait_for,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
DRAIN_TIMEOUT_S = 240.0  # after the load: at most one job per trainee is left, each ~10-30 s
USERS = 24
TRAINEES = 3  # users with 4 fixed pairs whose training is triggered during the soak
CLIENTS = 8  # feedback and read clients; one more generates, one more triggers training
GENERATE = {"prompt": "Say hello.", "max_tokens": 4, "temperature": 0}
ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "soak.json"
# Clients drop a connection idle this long, well before the server's keep-alive timeout (uvicorn:
# 5 s) closes it. With both at 5 s, a request sent on a connection idle for about 5 s could reach
# the server just as it closed the connection: "Server disconnected without sending a response".
CLIENT_KEEPALIVE_S = 1.0
NO_ANSWER = (httpx.RemoteProtocolError, httpx.NetworkError)  # the request got no response
NO_ANSWER_RETRIES = 3

pytestmark = pytest.mark.slow


@pytest.fixture
def soak_server(tmp_path: Path) -> Iterator[LiveServer]:
    """The API (in-process generation) and one training worker on private Postgres and Redis."""
    with private_postgres() as pg, private_redis() as broker:
        upgrade_to_head(pg.url)
        settings = make_settings(
            tmp_path,
            pg.url,
            broker_url=broker.url,
            base_model=str(model_dir()),
            train_defaults=TINY_TRAINING,
            gate_mc_limit=2,
            gate_prompt_limit=2,
            local_threads=1,
            # The soak measures the service, not the per-key limiters (tested elsewhere).
            rate_limit_generate_per_min=0,
            rate_limit_train_per_hour=0,
        )
        server = LiveServer(settings).start()
        worker = WorkerProcess(settings_env(settings), "gpu", tmp_path / "gpu.log").start()
        try:
            yield server
        finally:
            worker.stop()
            server.stop()


class Ledger:
    """What the clients saw: latencies, statuses, and the pair id each key was acknowledged with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.statuses: dict[int, int] = {}
        self.route_statuses: dict[str, dict[int, int]] = {}
        self.acked: dict[str, int] = {}  # idempotency key -> pair id
        self.jobs: dict[str, str] = {}  # job id -> user id, from every train answer
        self.mismatches: list[str] = []
        self.bad: list[str] = []
        self.no_answer: dict[str, int] = {}  # requests sent again after getting no response

    def record(self, kind: str, response: httpx.Response, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            route = self.route_statuses.setdefault(kind, {})
            route[response.status_code] = route.get(response.status_code, 0) + 1

    def unanswered(self, kind: str) -> None:
        with self.lock:
            self.no_answer[kind] = self.no_answer.get(kind, 0) + 1

    def ack(self, key: str, pair_id: int) -> None:
        with self.lock:
            seen = self.acked.setdefault(key, pair_id)
            if seen != pair_id:
                self.mismatches.append(f"{key}: {seen} != {pair_id}")


class Client:
    """One simulated client thread's behaviour."""

    def __init__(
        self,
        base_url: str,
        users: list[tuple[str, dict[str, str]]],
        trainees: list[tuple[str, dict[str, str]]],
        ledger: Ledger,
    ):
        limits = httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_S)
        self.http = httpx.Client(base_url=base_url, timeout=60, limits=limits)
        self.users, self.trainees, self.ledger = users, trainees, ledger
        self.rng = random.Random()

    def _send(self, kind: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        """Send; a request that got no response is sent again as it was (feedback posts keep
        their Idempotency-Key, so a pair the server did store is replayed, not stored twice)."""
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                response = self.http.request(method, path, **kwargs)  # type: ignore[arg-type]
            except NO_ANSWER:
                self.ledger.unanswered(kind)
                if attempt == NO_ANSWER_RETRIES:
                    raise
                continue
            self.ledger.record(kind, response, time.monotonic() - started)
            return response
        raise AssertionError("unreachable")

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

    def generate(self) -> None:
        """A short greedy answer for any user (a trainee's is served with its adapter)."""
        user_id, auth = self.rng.choice(self.users + self.trainees)
        path = f"/users/{user_id}/generate"
        response = self._send("generate", "POST", path, json=GENERATE, headers=auth)
        if response.status_code != 200 or not response.json()["usage"]["completion_tokens"]:
            self.ledger.bad.append(f"generate {response.status_code} {response.text[:200]}")

    def train(self) -> None:
        """A training trigger: a new job (202) or the user's active one (200)."""
        user_id, auth = self.rng.choice(self.trainees)
        path = f"/users/{user_id}/train"
        response = self._send("train_post", "POST", path, json={}, headers=auth)
        if response.status_code not in (200, 202):
            self.ledger.bad.append(f"train {response.status_code} {response.text[:200]}")
            return
        job = response.json()
        with self.ledger.lock:
            self.ledger.jobs[job["id"]] = user_id
        if response.status_code == 200 and job["status"] not in ("queued", "running"):
            self.ledger.bad.append(f"train 200 with a {job['status']} job")

    def _until_acked(self, user_id: str, auth: dict[str, str], key: str) -> None:
        for _ in range(50):
            if self.post_pair(user_id, auth, key):
                return
            time.sleep(0.05)
        self.ledger.bad.append(f"key {key} never acknowledged")


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_ms": round(quantile(values, 0.5) * 1e3, 1),
        "p95_ms": round(quantile(values, 0.95) * 1e3, 1),
        "p99_ms": round(quantile(values, 0.99) * 1e3, 1),
        "max_ms": round(max(values) * 1e3, 1),
    }


def _report(ledger: Ledger, elapsed: float, drain_s: float) -> dict[str, object]:
    total = sum(ledger.statuses.values())
    errors = sum(n for status, n in ledger.statuses.items() if status >= 500)
    routes = {}
    for kind, values in sorted(ledger.latencies.items()):
        statuses = ledger.route_statuses[kind]
        failed = sum(n for status, n in statuses.items() if status >= 500)
        routes[kind] = {
            **_percentiles(values),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "error_rate_5xx": failed / len(values),
        }
    return {
        "seconds": round(elapsed, 1),
        "users": USERS,
        "trainees": TRAINEES,
        "clients": CLIENTS,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(ledger.statuses.items())},
        "error_rate_5xx": errors / total,
        "acknowledged_pairs": len(ledger.acked),
        "retried_without_answer": dict(sorted(ledger.no_answer.items())),
        "training_jobs": len(ledger.jobs),
        "drain_s": round(drain_s, 1),
        "latency": routes,
    }


def _run_seconds(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """How long the succeeded jobs ran, claim to end (tiny trainings, under the soak's load)."""
    runs = [
        (job["finished_at"] - job["started_at"]).total_seconds()
        for job in jobs
        if job["status"] == "succeeded"
    ]
    return {"count": len(runs), "median": round(statistics.median(runs), 1)} if runs else {}


def _jobs(url: str) -> list[dict[str, Any]]:
    """Every training job row (a fresh connection, outside the app's pool)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT id, user_id, status, started_at, finished_at FROM training_jobs"
            return [dict(row._mapping) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


def test_soak_stores_exactly_the_acknowledged_pairs(soak_server: LiveServer) -> None:
    api = Api(soak_server.url)
    users = [api.create_user(f"soak{i:02d}") for i in range(USERS)]
    trainees = [api.create_user(f"trainee{i}") for i in range(TRAINEES)]
    for user_id, auth in trainees:
        post_pairs(api.http, user_id, auth)
    warm = api.http.post(f"/users/{users[0][0]}/generate", json=GENERATE, headers=users[0][1])
    assert warm.status_code == 200, warm.text  # the model loads before the clock starts
    ledger = Ledger()
    deadline = time.monotonic() + SOAK_SECONDS

    def client_loop() -> None:
        client = Client(soak_server.url, users, trainees, ledger)
        with ThreadPoolExecutor(1) as pool:
            while time.monotonic() < deadline:
                client.step(pool)

    def generate_loop() -> None:  # one client asking for answers back to back
        client = Client(soak_server.url, users, trainees, ledger)
        while time.monotonic() < deadline:
            client.generate()

    def train_loop() -> None:  # one client triggering trainings, every second
        client = Client(soak_server.url, users, trainees, ledger)
        while time.monotonic() < deadline:
            client.train()
            time.sleep(1)

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS + 2) as clients:
        loops = [client_loop] * CLIENTS + [generate_loop, train_loop]
        for future in [clients.submit(loop) for loop in loops]:
            future.result()
    elapsed = time.monotonic() - started

    # The worker drains what is left: at most one queued or running job per trainee.
    url = soak_server.settings.database_url
    wait_for(
        lambda: all(job["status"] not in ("queued", "running") for job in _jobs(url)),
        DRAIN_TIMEOUT_S,
        "every training job to end",
        interval=1,
    )
    drain_s = time.monotonic() - started - elapsed
    report = {**_report(ledger, elapsed, drain_s), "job_run_s": _run_seconds(_jobs(url))}
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    assert ledger.bad == [] and ledger.mismatches == []
    assert report["error_rate_5xx"] == 0 and len(ledger.acked) > 50
    stored = count_rows(url, "preference_pairs")
    trainee_pairs = 4 * TRAINEES
    assert stored == len(ledger.acked) + trainee_pairs  # every acknowledged pair, no duplicate
    assert len(set(ledger.acked.values())) == len(ledger.acked)
    per_user = sum(api.http.get(f"/users/{u}", headers=a).json()["pair_count"] for u, a in users)
    assert per_user == stored - trainee_pairs

    jobs = _jobs(url)
    assert ledger.route_statuses["train_post"].get(202, 0) >= TRAINEES, ledger.route_statuses
    assert {str(job["id"]): job["user_id"] for job in jobs} == ledger.jobs  # no job unaccounted
    assert {job["status"] for job in jobs} == {"succeeded"}, jobs
    for user_id, _auth in trainees:  # one job at a time per user: their runs never overlap
        runs = sorted((j["started_at"], j["finished_at"]) for j in jobs if j["user_id"] == user_id)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(runs)), runs
    api.close()


class AnswerDropper:
    """A TCP relay in front of the server that, on its first `drops` connections, passes the
    request on but closes the client's connection without its answer: what a client sees when a
    keep-alive connection is closed under it, with the server having done the work or not."""

    def __init__(self, target_port: int, drops: int) -> None:
        self.target_port, self.drops = target_port, drops
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            drop, self.drops = self.drops > 0, self.drops - 1
            threading.Thread(target=self._serve, args=(conn, drop), daemon=True).start()

    def _serve(self, conn: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        if drop:
            conn.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while chunk := conn.recv(65536):  # the whole request, then its answer is dropped
                    upstream.sendall(chunk)
            upstream.recv(65536)
            conn.close()
            upstream.close()
            return
        for source, sink in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[LiveServer]:
    """The API on SQLite (no worker): for the soak client's own behaviour."""
    server = LiveServer(make_settings(tmp_path)).start()
    yield server
    server.stop()


def test_soak_client_retries_a_post_that_got_no_answer_under_its_key(
    small_server: LiveServer,
) -> None:
    api = Api(small_server.url)
    user_id, auth = api.create_user("no-answer")
    relay = AnswerDropper(small_server.port, drops=1)
    ledger = Ledger()
    try:
        assert Client(relay.url, [], [], ledger).post_pair(user_id, auth, "key-1")
    finally:
        relay.close()
    assert ledger.no_answer == {"feedback_post": 1}  # counted, not a crash
    assert ledger.bad == [] and ledger.mismatches == [] and list(ledger.acked) == ["key-1"]
    listed = api.http.get(f"/users/{user_id}/feedback", headers=auth).json()["data"]
    assert [pair["id"] for pair in listed] == [ledger.acked["key-1"]]  # stored once
    api.close()


def test_soak_client_drops_idle_connections_before_the_server_does(
    small_server: LiveServer,
) -> None:
    """The server closes a connection idle for its keep-alive timeout; a client that reuses one
    about that old can send its request just as it closes and get no answer. The soak client must
    have opened a new connection by then."""
    server_keepalive = small_server.server.config.timeout_keep_alive
    client = Client(small_server.url, [], [], Ledger())
    first = _local_port(client.http.get("/healthz"))
    time.sleep(server_keepalive - 1)
    assert _local_port(client.http.get("/healthz")) != first
    client.http.close()


def _local_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])
