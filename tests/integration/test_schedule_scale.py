"""The scheduler and the reaper at scale, on a real migrated Postgres and a private Redis broker.

Thousands of rows are written directly with SQL (no API, no worker, no training): the tests check
which jobs one tick creates or re-sends and what the broker holds afterwards.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from kombu import Connection
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker, transaction
from app.models import PreferencePair, TrainingJob, utcnow
from app.queue import GPU_QUEUE, send_training
from app.services import schedule as schedule_service
from foundation.pairs import prompt_hash
from tests.fault_support import private_redis
from tests.support import make_settings, postgres_database
from worker.schedule import enqueue_due_retrains

DUE_USERS = 1000
QUEUED_JOBS = 2000
ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "schedule_scale.json"


@dataclass
class Db:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]

    def with_settings(self, **overrides: object) -> Settings:
        """These settings with some values changed."""
        return self.settings.model_copy(update=overrides)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    """A fresh Postgres database and a private Redis as the broker."""
    with postgres_database() as url, private_redis() as broker:
        settings = make_settings(
            tmp_path,
            url,
            broker_url=broker.url,
            retrain_min_new_pairs=3,
            min_pairs_to_train=2,
            retrain_max_queued=600,
            job_resend_after_s=600,
        )
        engine = make_engine(settings)
        yield Db(settings, engine, make_sessionmaker(engine))
        engine.dispose()


def _insert_users(engine: Engine, user_ids: list[str]) -> None:
    rows = [{"id": user_id, "created_at": utcnow()} for user_id in user_ids]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, created_at) VALUES (:id, :created_at)"), rows)


def _insert_due_users(engine: Engine, count: int, pairs_each: int = 3) -> list[str]:
    """`count` users with `pairs_each` pairs each, their pairs written in a random interleaving;
    returns the user ids ordered by their oldest pair (the fair order)."""
    users = [f"due{i:04d}" for i in range(count)]
    _insert_users(engine, users)
    writes = [user for user in users for _ in range(pairs_each)]
    random.Random(16).shuffle(writes)
    rows = []
    for n, user_id in enumerate(writes):
        messages = [{"role": "user", "content": f"{user_id} question {n}"}]
        rows.append(
            {
                "user_id": user_id,
                "messages": messages,
                "prompt_hash": prompt_hash(messages),
                "chosen": "yes",
                "rejected": "no",
                "created_at": utcnow(),
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(PreferencePair), rows)  # ids increase in `writes` order
    first_write = {user: writes.index(user) for user in users}
    return sorted(users, key=first_write.__getitem__)


def _jobs(factory: sessionmaker[Session]) -> list[TrainingJob]:
    with transaction(factory) as session:
        return list(session.scalars(select(TrainingJob).order_by(TrainingJob.created_at)))


def _drain_broker(settings: Settings) -> list[str]:
    """Job ids of the training messages waiting in the broker, in delivery order (consumed)."""
    ids = []
    with Connection(settings.broker_url) as conn:
        queue = conn.SimpleQueue(GPU_QUEUE)
        while True:
            try:
                message = queue.get_nowait()
            except queue.Empty:
                break
            ids.append(message.payload[0][0])
            message.ack()
        queue.close()
    return ids


def test_a_tick_admits_every_due_user_up_to_the_queue_depth_oldest_feedback_first(db: Db) -> None:
    fair_order = _insert_due_users(db.engine, DUE_USERS)
    limit = db.settings.retrain_max_queued
    started = time.monotonic()
    first = enqueue_due_retrains(db.settings)
    tick_s = time.monotonic() - started
    assert len(first) == min(DUE_USERS, limit)
    jobs = _jobs(db.factory)
    assert [job.user_id for job in jobs] == fair_order[:limit]  # oldest un-trained feedback first
    assert all(job.trigger == "schedule" and job.status == "queued" for job in jobs)
    assert _drain_broker(db.settings) == [job.id for job in jobs]  # delivered in that order too

    assert enqueue_due_retrains(db.settings) == []  # the queue is full: nothing more, no duplicate
    roomy = db.with_settings(retrain_max_queued=5 * DUE_USERS)
    rest = enqueue_due_retrains(roomy)
    assert len(rest) == DUE_USERS - limit
    assert enqueue_due_retrains(roomy) == []  # everyone has a job now
    jobs = _jobs(db.factory)
    per_user = Counter(job.user_id for job in jobs)
    assert len(jobs) == DUE_USERS and set(per_user.values()) == {1}  # one job per user
    assert [job.user_id for job in jobs] == fair_order
    assert _drain_broker(db.settings) == rest
    _record("scheduler_tick", {"due_users": DUE_USERS, "admitted": limit, "seconds": tick_s})


def _insert_queued_jobs(engine: Engine, count: int, idle_for_s: float) -> list[str]:
    """`count` queued jobs (one user each), idle for about `idle_for_s`, oldest first."""
    users = [f"queued{i:04d}" for i in range(count)]
    _insert_users(engine, users)
    start = utcnow() - timedelta(seconds=idle_for_s)
    rows = [
        {
            "id": f"job_{i:024d}",
            "user_id": user_id,
            "status": "queued",
            "method": "bapo",
            "hyperparameters": {},
            "trigger": "schedule",
            "created_at": start + timedelta(milliseconds=i),
        }
        for i, user_id in enumerate(users)
    ]
    with engine.begin() as conn:
        conn.execute(insert(TrainingJob), rows)
    return [str(row["id"]) for row in rows]


def _reap(db: Db) -> schedule_service.ReapReport:
    with transaction(db.factory) as session:
        return schedule_service.reap_stale_jobs(session, db.settings)


def test_the_reaper_resends_only_lost_messages_in_bounded_batches(db: Db) -> None:
    job_ids = _insert_queued_jobs(db.engine, QUEUED_JOBS, db.settings.job_resend_after_s + 60)
    lost = set(random.Random(7).sample(job_ids, 2 * schedule_service.RESEND_BATCH + 30))
    held = [job_id for job_id in job_ids if job_id not in lost]
    delivered, orphaned = held[0], held[1]
    for job_id in [delivered, orphaned, *held[2:]]:  # the first two are delivered below
        send_training(db.settings, job_id)
    # A consumer takes the first two and dies before claiming them (no ack, no restore); the
    # second delivery happened long ago, so its consumer is presumed gone.
    taken = _deliver_and_die(db.settings, 2)
    assert [job_id for job_id, _ in taken] == [delivered, orphaned]
    old = time.time() - db.settings.job_resend_after_s - 60
    redis.Redis.from_url(db.settings.broker_url).zadd("unacked_index", {taken[1][1]: old})

    started = time.monotonic()
    first = _reap(db).resent
    reap_s = time.monotonic() - started
    lost_in_order = [job_id for job_id in job_ids if job_id in lost | {orphaned}]
    assert first == lost_in_order[: schedule_service.RESEND_BATCH]  # oldest first, bounded
    resent = first
    while batch := _reap(db).resent:
        assert len(batch) <= schedule_service.RESEND_BATCH
        resent += batch
    assert resent == lost_in_order  # each lost message re-sent once; the held ones never
    waiting = Counter(_drain_broker(db.settings))
    assert set(waiting) == set(job_ids) - {delivered} and set(waiting.values()) == {1}
    _record("reaper_pass", {"queued_jobs": QUEUED_JOBS, "lost": len(lost) + 1, "seconds": reap_s})


def _deliver_and_die(settings: Settings, count: int) -> list[tuple[str, str]]:
    """A consumer process takes `count` training messages and exits without acknowledging them
    (like a worker killed -9): (job id, delivery tag) of each."""
    script = (
        "import os, sys\n"
        "from kombu import Connection\n"
        "queue = Connection(sys.argv[1]).SimpleQueue(sys.argv[2])\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    message = queue.get(timeout=10)\n"
        "    print(message.payload[0][0], message.delivery_tag, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, settings.broker_url, GPU_QUEUE, str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [(line.split()[0], line.split()[1]) for line in done.stdout.splitlines()]


def _record(name: str, figures: dict[str, object]) -> None:
    """Keep the measured figures in test-artifacts/schedule_scale.json."""
    ARTIFACT.parent.mkdir(exist_ok=True)
    recorded = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    recorded[name] = figures
    ARTIFACT.write_text(json.dumps(recorded, indent=2))
    print(name, figures)
