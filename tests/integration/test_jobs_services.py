"""Job services on a real, migrated Postgres: the scheduler's choice, the reaper, the claim, caches.

No worker here; the broker is the SQLite one in a temp folder, and its queue is read back to check
what was sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker, transaction
from app.models import JobEvent, TrainingJob, User, utcnow
from app.queue import GPU_QUEUE, broker_transport_options
from app.services import job_leases
from app.services import jobs as job_service
from app.services import schedule as schedule_service
from app.services.feedback import store_pairs
from foundation.pairs import Pair
from tests.support import make_settings, postgres_database
from worker.caches import base_response_cache, reference_logprob_cache

SCHEDULE = {"retrain_min_new_pairs": 3, "retrain_max_queued": 3, "min_pairs_to_train": 2}


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def db(pg_url: str, tmp_path: Path) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    """Settings (SQLite broker in tmp_path) and sessions; the tables are emptied afterwards."""
    settings = make_settings(
        tmp_path,
        pg_url,
        job_stale_after_s=60,
        job_max_attempts=2,
        job_resend_after_s=600,
        **SCHEDULE,
    )
    engine = make_engine(settings)
    yield settings, make_sessionmaker(engine)
    with engine.begin() as conn:
        for table in (
            "job_events",
            "training_jobs",
            "preference_pairs",
            "api_keys",
            "users",
            "base_responses",
            "reference_logprobs",
        ):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    engine.dispose()


def _user(factory: sessionmaker[Session], user_id: str, pairs: int) -> list[int]:
    """A user with `pairs` pairs; their ids, oldest first."""
    with transaction(factory) as session:
        session.add(User(id=user_id))
        session.flush()
        rows = [
            Pair([{"role": "user", "content": f"{user_id} {i}"}], "yes", "no", None)
            for i in range(pairs)
        ]
        body = store_pairs(session, user_id, rows, None).body
    return [p["id"] for p in body["pairs"]]


def _job(
    factory: sessionmaker[Session],
    user_id: str,
    status: str,
    last_pair_id: int | None,
    **values: Any,
) -> str:
    job_id = job_service.new_job_id()
    with transaction(factory) as session:
        session.add(
            TrainingJob(
                id=job_id,
                user_id=user_id,
                status=status,
                method="bapo",
                hyperparameters={},
                trigger="api",
                pair_count=0,
                last_pair_id=last_pair_id,
                **values,
            )
        )
    return job_id


def _queued_messages(settings: Settings) -> list[str]:
    """Job ids of the training messages waiting in the broker."""
    ids = []
    with Connection(settings.broker_url, transport_options=broker_transport_options(settings)) as c:
        queue = c.SimpleQueue(GPU_QUEUE)
        while queue.qsize():
            message = queue.get(timeout=1)
            ids.append(message.payload[0][0])
            message.ack()
        queue.close()
    return ids


def test_scheduler_picks_exactly_the_due_users_oldest_feedback_first(
    db: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = db
    due_first = _user(factory, "due-first", 3)  # no job yet, oldest feedback
    _user(factory, "too-few", 2)  # below retrain_min_new_pairs
    busy = _user(factory, "busy", 5)
    _job(factory, "busy", "queued", busy[-1])  # has an active job
    trained = _user(factory, "trained", 5)
    _job(factory, "trained", "succeeded", trained[2])  # only 2 new pairs since
    retrained = _user(factory, "retrained", 5)
    _job(factory, "retrained", "succeeded", retrained[1])  # 3 new pairs since: due
    tried = _user(factory, "failed-tried", 4)
    _job(factory, "failed-tried", "failed", tried[-1])  # a failed job saw all of them
    due_later = _user(factory, "due-later", 3)
    with transaction(factory) as session:
        assert schedule_service.due_users(session, settings, 2) == ["due-first", "retrained"]
        # the queue holds 3 at most and "busy" waits there: room for 2
        created = schedule_service.enqueue_due_retrains(session, settings, batch=10)
    assert len(created) == 2
    with transaction(factory) as session:
        jobs = {
            j.user_id: j for j in session.query(TrainingJob).filter(TrainingJob.id.in_(created))
        }
        assert set(jobs) == {"due-first", "retrained"}
        assert all(j.trigger == "schedule" and j.status == "queued" for j in jobs.values())
        assert jobs["due-first"].last_pair_id == due_first[-1]
        assert schedule_service.due_users(session, settings, 10) == ["due-later"]  # next tick
        assert schedule_service.enqueue_due_retrains(session, settings, batch=10) == []  # full
    assert sorted(_queued_messages(settings)) == sorted(created)
    assert due_later  # created last: its pairs are the newest


def test_a_new_pair_makes_a_failed_user_due_again(
    db: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = db
    pairs = _user(factory, "flaky", 3)
    _job(factory, "flaky", "failed", pairs[-1])
    with transaction(factory) as session:
        assert schedule_service.due_users(session, settings, 10) == []
    _user_pairs_add(factory, "flaky")
    with transaction(factory) as session:
        assert schedule_service.due_users(session, settings, 10) == ["flaky"]


def _user_pairs_add(factory: sessionmaker[Session], user_id: str) -> None:
    with transaction(factory) as session:
        store_pairs(
            session,
            user_id,
            [Pair([{"role": "user", "content": "new"}], "yes", "no", None)],
            None,
        )


def test_only_one_of_concurrent_claims_wins(db: tuple[Settings, sessionmaker[Session]]) -> None:
    _, factory = db
    pairs = _user(factory, "racer", 2)
    job_id = _job(factory, "racer", "queued", pairs[-1])
    claims: list[job_leases.Claim | None] = []
    start = threading.Barrier(8)

    def claim(worker: int) -> None:
        start.wait()
        with transaction(factory) as session:
            claims.append(job_leases.claim_job(session, job_id, f"worker-{worker}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].attempt == 1
    with transaction(factory) as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.status == "running" and job.attempts == 1


def test_reaper_requeues_then_fails_stale_jobs_and_fences_the_lost_worker(
    db: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = db
    pairs = _user(factory, "stale", 2)
    job_id = _job(factory, "stale", "queued", pairs[-1])
    with transaction(factory) as session:
        claim = job_leases.claim_job(session, job_id, "doomed")
    assert claim is not None
    staging = settings.adapter_store.staging_folder(claim.user_id, claim.job_id, claim.attempt)
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"half")
    later = utcnow() + timedelta(seconds=settings.job_stale_after_s + 1)
    with transaction(factory) as session:
        assert schedule_service.reap_stale_jobs(session, settings, utcnow()).requeued == []
    with transaction(factory) as session:
        report = schedule_service.reap_stale_jobs(session, settings, later)
    assert report.requeued == [job_id] and not staging.exists()
    assert _queued_messages(settings) == [job_id]
    with transaction(factory) as session:  # the old worker learns it lost the job
        assert job_leases.heartbeat(session, claim) is None
        assert job_leases.finish_job(session, claim, "succeeded") is False
        second = job_leases.claim_job(session, job_id, "next")
    assert second is not None and second.attempt == 2
    even_later = later + timedelta(seconds=settings.job_stale_after_s * 2)
    with transaction(factory) as session:
        report = schedule_service.reap_stale_jobs(session, settings, even_later)
    assert report.failed == [job_id]
    with transaction(factory) as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None and job.status == "failed" and job.finished_at is not None
        assert job.error is not None and "gave up after 2 attempt(s)" in job.error


def test_reaper_cancels_a_stale_job_whose_cancel_was_requested(
    db: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = db
    pairs = _user(factory, "gone", 2)
    old = utcnow() - timedelta(seconds=settings.job_stale_after_s + 5)
    job_id = _job(
        factory, "gone", "running", pairs[-1], attempts=1, heartbeat_at=old, cancel_requested=True
    )
    with transaction(factory) as session:
        report = schedule_service.reap_stale_jobs(session, settings)
    assert report.cancelled == [job_id]
    assert _queued_messages(settings) == []


def test_reaper_resends_idle_queued_jobs_once_per_period(
    db: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = db
    pairs = _user(factory, "idle", 2)
    idle_since = utcnow() - timedelta(seconds=settings.job_resend_after_s + 5)
    job_id = _job(factory, "idle", "queued", pairs[-1], created_at=idle_since)
    fresh = _user(factory, "fresh", 2)
    _job(factory, "fresh", "queued", fresh[-1])
    with transaction(factory) as session:
        assert schedule_service.reap_stale_jobs(session, settings).resent == [job_id]
    with transaction(factory) as session:
        assert schedule_service.reap_stale_jobs(session, settings).resent == []
    assert _queued_messages(settings) == [job_id]


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_db_caches_store_once_and_return_what_is_there(
    kind: str, pg_url: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, pg_url if kind == "postgres" else "")
    if settings.is_sqlite:
        from app.core.db import upgrade_to_head

        upgrade_to_head(settings.database_url)
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    base, ref = base_response_cache(factory), reference_logprob_cache(factory)
    keys = [f"model:{i}" for i in range(1200)]  # more than one IN (...) chunk
    base.put_many({k: f"answer {k}" for k in keys})
    base.put_many({keys[0]: "different"})  # first value stays
    ref.put_many({"model:a": -1.5})
    assert base.get_many([*keys, "missing"]) == {k: f"answer {k}" for k in keys}
    assert ref.get_many(["model:a", "model:b"]) == {"model:a": -1.5}
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM base_responses")
        conn.exec_driver_sql("DELETE FROM reference_logprobs")
    engine.dispose()


def test_a_worker_whose_job_was_deleted_is_told_to_stop(
    db: tuple[Settings, sessionmaker[Session]],
) -> None:
    _, factory = db
    pairs = _user(factory, "leaver", 2)
    job_id = _job(factory, "leaver", "queued", pairs[-1])
    with transaction(factory) as session:
        claim = job_leases.claim_job(session, job_id, "w")
    with transaction(factory) as session:
        session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
        session.execute(delete(TrainingJob).where(TrainingJob.user_id == "leaver"))
    assert claim is not None
    with transaction(factory) as session:
        assert job_leases.record_step(session, claim, 1, {"loss": 1.0}, 0.5) is None


def test_concurrent_triggers_make_one_job(db: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = db
    _user(factory, "eager", 2)
    results: list[tuple[str, bool]] = []
    start = threading.Barrier(6)

    def trigger() -> None:
        start.wait()
        with transaction(factory) as session:
            job, created = job_service.start_job(session, settings, "eager")
            results.append((job.id, created))

    threads = [threading.Thread(target=trigger) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert _queued_messages(settings) == [results[0][0]]
