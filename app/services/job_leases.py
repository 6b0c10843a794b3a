"""A worker's lease on a training job: the claim, fenced progress writes, heartbeats, the end.

Every change a worker makes is fenced by its claim: each UPDATE matches `status='running' AND
attempts=<the attempt it claimed>`, so a worker that lost its job (reaped, cancelled, user deleted)
changes nothing and learns that it must stop. Creating, reading and cancelling jobs is
app.services.jobs. Nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import rows_matched
from app.models import PreferencePair, TrainingJob, utcnow
from app.queue import enqueue_training
from app.services.jobs import add_event

FINISHED_STATUSES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one job: the attempt number is the fencing token."""

    job_id: str
    user_id: str
    attempt: int
    worker_id: str


@dataclass(frozen=True)
class JobSignals:
    """What a running job's worker learns on each write: whether to stop."""

    cancel_requested: bool


def claim_job(session: Session, job_id: str, worker_id: str) -> Claim | None:
    """queued → running for this worker, atomically; None when the job is not queued (any more).

    This conditional UPDATE is what makes a redelivered or duplicated message harmless.
    """
    now = utcnow()
    row = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.status == "queued")
        .values(
            status="running",
            attempts=TrainingJob.attempts + 1,
            worker_id=worker_id[:255],
            started_at=func.coalesce(
                TrainingJob.started_at, literal(now, TrainingJob.started_at.type)
            ),
            heartbeat_at=now,
            phase="starting",
            progress=0.0,
            error=None,
        )
        .returning(TrainingJob.user_id, TrainingJob.attempts)
    ).one_or_none()
    if row is None:
        return None
    claim = Claim(job_id, row.user_id, row.attempts, worker_id)
    add_event(
        session,
        job_id,
        "status",
        {
            "status": "running",
            "attempt": claim.attempt,
            "worker": worker_id,
            "message": "claimed by a worker",
        },
    )
    return claim


def fence(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    """The conditions under which the claim still holds: this job, running, this attempt."""
    return (
        TrainingJob.id == claim.job_id,
        TrainingJob.status == "running",
        TrainingJob.attempts == claim.attempt,
    )


def _touch(session: Session, claim: Claim, **values: Any) -> JobSignals | None:
    """Fenced update of a running job (heartbeat included); None when the claim is lost."""
    row = session.execute(
        update(TrainingJob)
        .where(*fence(claim))
        .values(heartbeat_at=utcnow(), **values)
        .returning(TrainingJob.cancel_requested)
    ).one_or_none()
    return None if row is None else JobSignals(bool(row.cancel_requested))


def heartbeat(session: Session, claim: Claim) -> JobSignals | None:
    """Record that the worker is alive; None when the claim is lost."""
    return _touch(session, claim)


def record_phase(session: Session, claim: Claim, phase: str) -> JobSignals | None:
    """Record the job's current phase (and an event); None when the claim is lost."""
    signals = _touch(session, claim, phase=phase[:32])
    if signals is not None:
        add_event(session, claim.job_id, "phase", {"phase": phase})
    return signals


def record_step(
    session: Session, claim: Claim, step: int, metrics: dict[str, Any], progress: float
) -> JobSignals | None:
    """Record one training step's metrics and the progress; None when the claim is lost."""
    signals = _touch(session, claim, progress=min(max(progress, 0.0), 1.0))
    if signals is not None:
        add_event(session, claim.job_id, "step", metrics, step=step)
    return signals


def job_pairs(session: Session, claim: Claim) -> list[PreferencePair]:
    """The pairs the job trains on: the user's, up to the newest one when the job was created."""
    job = session.get(TrainingJob, claim.job_id)
    if job is None or job.last_pair_id is None:
        return []
    return list(
        session.scalars(
            select(PreferencePair)
            .where(PreferencePair.user_id == claim.user_id, PreferencePair.id <= job.last_pair_id)
            .order_by(PreferencePair.id)
        )
    )


def hold_claim(session: Session, claim: Claim) -> TrainingJob | None:
    """The job, locked for this transaction, if this worker still holds it (before publishing)."""
    return session.scalar(select(TrainingJob).where(*fence(claim)).with_for_update())


def finish_job(
    session: Session,
    claim: Claim,
    status: str,
    *,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
    adapter_version: int | None = None,
) -> bool:
    """running → succeeded/failed/cancelled, fenced; False when the claim was already lost."""
    assert status in FINISHED_STATUSES
    values: dict[str, Any] = {
        "status": status,
        "finished_at": utcnow(),
        "error": error,
        "phase": None,
    }
    if status == "succeeded":
        values.update(progress=1.0, metrics=metrics, adapter_version=adapter_version)
    elif metrics is not None:
        values["metrics"] = metrics
    finished = session.execute(update(TrainingJob).where(*fence(claim)).values(**values))
    done = rows_matched(finished) > 0
    if done:
        message = error or f"job {status}"
        add_event(session, claim.job_id, "status", {"status": status, "message": message[:2000]})
    return done


def release_job(
    session: Session,
    settings: Settings,
    claim: Claim,
    reason: str,
    *,
    delay_s: float | None = None,
    count_attempt: bool = True,
) -> str:
    """Give a job back to the queue (re-sent after commit), or fail it when out of attempts.

    Returns the job's new status ("queued" or "failed"), or "lost" when the claim was lost.
    """
    if count_attempt and claim.attempt >= settings.job_max_attempts:
        failed = finish_job(
            session, claim, "failed", error=(f"gave up after {claim.attempt} attempt(s): {reason}")
        )
        return "failed" if failed else "lost"
    attempts = TrainingJob.attempts if count_attempt else TrainingJob.attempts - 1
    released = session.execute(
        update(TrainingJob)
        .where(*fence(claim))
        .values(
            status="queued",
            worker_id=None,
            phase="requeued",
            attempts=attempts,
            heartbeat_at=utcnow(),
        )
    )
    if not rows_matched(released):
        return "lost"
    add_event(session, claim.job_id, "status", {"status": "queued", "message": reason[:2000]})
    enqueue_training(session, settings, claim.job_id, countdown=delay_s)
    return "queued"
