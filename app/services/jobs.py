"""Training jobs: creation (one active job per user), reads, cancellation, and the state changes a
worker makes while it holds a job.

A worker's changes are fenced by its claim: every UPDATE matches `status='running' AND
attempts=<the attempt it claimed>`, so a worker that lost its job (reaped, cancelled, user deleted)
changes nothing and learns that it must stop. Nothing here commits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import BadRequest, Conflict, InvalidRequest, NotFound
from app.core.train_limits import limit_violations
from app.models import ACTIVE_JOB_STATUSES, JobEvent, PreferencePair, TrainingJob, utcnow
from app.queue import enqueue_training
from app.services.users import get_user
from foundation.train_config import ConfigError, TrainConfig

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


# --- creating jobs --------------------------------------------------------------------------------


def new_job_id() -> str:
    """A fresh job id."""
    return "job_" + secrets.token_hex(12)


def resolve_hyperparameters(
    settings: Settings, method: str | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """Every hyperparameter of a new job: engine defaults < TRAIN_DEFAULTS < the request."""
    overrides = dict(overrides or {})
    if method is not None and overrides.get("method", method) != method:
        raise InvalidRequest(
            "hyperparameters.method: differs from `method`",
            "invalid_hyperparameters",
            param="hyperparameters.method",
        )
    merged = {**settings.train_defaults, **overrides}
    if method is not None:
        merged["method"] = method
    try:
        config = TrainConfig.parse(merged)
    except ConfigError as exc:
        raise _invalid_hyperparameters(exc) from exc
    _check_limits(settings, config)
    return config.to_dict()


def _invalid_hyperparameters(exc: ConfigError) -> InvalidRequest:
    """The 422 for a hyperparameter TrainConfig.parse refused, naming it under `hyperparameters`."""
    text, name = str(exc), exc.field
    named = name is not None and text.startswith(name)  # "beta must be > 0", "epochs: ..."
    return InvalidRequest(
        f"hyperparameters.{text}" if named else f"hyperparameters: {text}",
        "invalid_hyperparameters",
        param=f"hyperparameters.{name}" if name else "hyperparameters",
    )


def _check_limits(settings: Settings, config: TrainConfig) -> None:
    """A 422 naming the first hyperparameter above the operator's bounds (TRAIN_MAX_*, VLLM_*)."""
    for name, message in limit_violations(settings, config):
        raise InvalidRequest(
            f"hyperparameters.{name}: {message}",
            "invalid_hyperparameters",
            param=f"hyperparameters.{name}",
        )


def start_job(
    session: Session,
    settings: Settings,
    user_id: str,
    *,
    method: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    trigger: str = "api",
    request_id: str | None = None,
) -> tuple[TrainingJob, bool]:
    """Create a queued job (enqueued after commit), or return the user's active one.

    Returns (job, created). A user has at most one queued/running job: the database's partial
    unique index settles concurrent triggers.
    """
    get_user(session, user_id)
    resolved = resolve_hyperparameters(settings, method, hyperparameters)
    active = active_job(session, user_id)
    if active is not None:
        return active, False
    pair_count, last_pair_id = _pair_snapshot(session, user_id)
    if pair_count < settings.min_pairs_to_train:
        raise InvalidRequest(
            f"Training needs at least {settings.min_pairs_to_train} preference pairs; "
            f"user {user_id!r} has {pair_count}",
            "not_enough_pairs",
        )
    job = TrainingJob(
        id=new_job_id(),
        user_id=user_id,
        status="queued",
        method=resolved["method"],
        hyperparameters=resolved,
        trigger=trigger,
        pair_count=pair_count,
        last_pair_id=last_pair_id,
        request_id=request_id,
        created_at=utcnow(),
    )
    stored = _insert_unless_active(session, job)
    if stored is not job:
        return stored, False
    message = f"job created ({pair_count} pairs)"
    add_event(
        session, job.id, "status", {"status": "queued", "trigger": trigger, "message": message}
    )
    enqueue_training(session, settings, job.id)
    return job, True


def _insert_unless_active(session: Session, job: TrainingJob) -> TrainingJob:
    """Insert the job; if a concurrent trigger won the partial unique index, return its job."""
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        existing = active_job(session, job.user_id)
        if existing is None:
            raise
        return existing
    return job


def active_job(session: Session, user_id: str) -> TrainingJob | None:
    """The user's queued or running job, if any."""
    return session.scalar(
        select(TrainingJob).where(
            TrainingJob.user_id == user_id, TrainingJob.status.in_(ACTIVE_JOB_STATUSES)
        )
    )


def _pair_snapshot(session: Session, user_id: str) -> tuple[int, int | None]:
    """(number of the user's pairs, id of the newest): a job trains on exactly these."""
    count, last = session.execute(
        select(func.count(), func.max(PreferencePair.id)).where(PreferencePair.user_id == user_id)
    ).one()
    return int(count), last


# --- reading and cancelling -----------------------------------------------------------------------


def get_job(session: Session, user_id: str, job_id: str) -> TrainingJob:
    """The user's job, or NotFound."""
    job = session.get(TrainingJob, job_id)
    if job is None or job.user_id != user_id:
        raise NotFound(f"Training job {job_id!r} not found", "job_not_found")
    return job


def list_jobs(
    session: Session, user_id: str, limit: int, cursor: str | None
) -> tuple[list[TrainingJob], str | None]:
    """A page of the user's jobs, newest first, and the cursor of the next page."""
    query = select(TrainingJob).where(TrainingJob.user_id == user_id)
    if cursor is not None:
        after = session.get(TrainingJob, cursor)
        if after is None or after.user_id != user_id:
            raise BadRequest(
                "cursor: not a cursor returned by this API", "invalid_cursor", param="cursor"
            )
        query = query.where(
            tuple_(TrainingJob.created_at, TrainingJob.id) < tuple_(after.created_at, after.id)
        )
    order = (TrainingJob.created_at.desc(), TrainingJob.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_cursor


def list_events(
    session: Session,
    user_id: str,
    job_id: str,
    limit: int,
    after: int | None,
    kind: str | None = None,
) -> tuple[list[JobEvent], bool]:
    """A page of the job's events, oldest first, after the event id `after`; (rows, has_more)."""
    get_job(session, user_id, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    if kind is not None:
        query = query.where(JobEvent.kind == kind)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, user_id: str, job_id: str) -> TrainingJob:
    """Cancel now if queued; ask the worker to stop between steps if running; 409 if finished."""
    job = get_job(session, user_id, job_id)
    now = utcnow()
    queued = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.status == "queued")
        .values(status="cancelled", cancel_requested=True, phase=None, finished_at=now)
    )
    if _rowcount(queued):
        add_event(
            session, job_id, "status", {"status": "cancelled", "message": "cancelled while queued"}
        )
    else:
        running = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == "running")
            .values(cancel_requested=True)
        )
        if _rowcount(running):
            add_event(session, job_id, "status", {"message": "cancellation requested"})
    session.refresh(job)
    if job.status in ("succeeded", "failed"):
        raise Conflict(
            f"Training job {job_id!r} already {job.status}; it cannot be cancelled", "job_finished"
        )
    return job


def job_view(job: TrainingJob, now: datetime | None = None) -> dict[str, Any]:
    """The API form of a job (the gate verdict is lifted out of its metrics)."""
    metrics = job.metrics or None
    gate = (metrics or {}).get("gate")
    end = job.finished_at or (now or utcnow())
    duration = (end - job.started_at).total_seconds() if job.started_at else None
    fields = (
        "id",
        "user_id",
        "status",
        "method",
        "trigger",
        "hyperparameters",
        "pair_count",
        "last_pair_id",
        "phase",
        "progress",
        "attempts",
        "cancel_requested",
        "error",
        "adapter_version",
        "created_at",
        "started_at",
        "heartbeat_at",
        "finished_at",
    )
    view = {name: getattr(job, name) for name in fields}
    return {**view, "metrics": metrics, "gate": gate, "duration_s": duration}


# --- the worker's side: claim, progress, finish ---------------------------------------------------


def add_event(
    session: Session, job_id: str, kind: str, data: dict[str, Any], step: int | None = None
) -> None:
    """Append one event to a job's log."""
    session.add(JobEvent(job_id=job_id, kind=kind, step=step, data=data, created_at=utcnow()))


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


def _fence(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    return (
        TrainingJob.id == claim.job_id,
        TrainingJob.status == "running",
        TrainingJob.attempts == claim.attempt,
    )


def _touch(session: Session, claim: Claim, **values: Any) -> JobSignals | None:
    """Fenced update of a running job (heartbeat included); None when the claim is lost."""
    row = session.execute(
        update(TrainingJob)
        .where(*_fence(claim))
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
    return session.scalar(select(TrainingJob).where(*_fence(claim)).with_for_update())


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
    done = (
        _rowcount(session.execute(update(TrainingJob).where(*_fence(claim)).values(**values))) > 0
    )
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
        .where(*_fence(claim))
        .values(
            status="queued",
            worker_id=None,
            phase="requeued",
            attempts=attempts,
            heartbeat_at=utcnow(),
        )
    )
    if not _rowcount(released):
        return "lost"
    add_event(session, claim.job_id, "status", {"status": "queued", "message": reason[:2000]})
    enqueue_training(session, settings, claim.job_id, countdown=delay_s)
    return "queued"


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE (typed accessor for mypy)."""
    return int(getattr(result, "rowcount", 0) or 0)
