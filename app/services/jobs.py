"""Training jobs: creation (one active job per user), reads, cancellation, and the job's log.

What a worker does while it holds a job (claim, heartbeats, progress, finish, release) is
app.services.job_leases. Nothing here commits.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Text, cast, func, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import rows_matched
from app.core.errors import BadRequest, Conflict, InvalidRequest, NotFound
from app.core.train_limits import limit_violations
from app.models import ACTIVE_JOB_STATUSES, JobEvent, PreferencePair, TrainingJob, utcnow
from app.queue import enqueue_training
from app.services.pagination import RowPage, paginate
from app.services.users import get_user
from foundation.train_config import ConfigError, TrainConfig

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
    metadata: dict[str, str] | None = None,
    training_file: str | None = None,
) -> tuple[TrainingJob, bool]:
    """Create a queued job (enqueued after commit), or return the user's active one.

    Returns (job, created). A user has at most one queued/running job: the database's partial
    unique index settles concurrent triggers. `metadata` (the client's labels) and
    `training_file` (the stored file imported for it) come from OpenAI's jobs API.
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
        meta=metadata,
        training_file=training_file,
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


def find_job(session: Session, job_id: str) -> TrainingJob:
    """The job, whoever's it is, or NotFound (the caller checks who may see it)."""
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise NotFound(f"Training job {job_id!r} not found", "job_not_found")
    return job


def get_job(session: Session, user_id: str, job_id: str) -> TrainingJob:
    """The user's job, or NotFound."""
    job = session.get(TrainingJob, job_id)
    if job is None or job.user_id != user_id:
        raise NotFound(f"Training job {job_id!r} not found", "job_not_found")
    return job


def list_jobs(
    session: Session,
    user_id: str | None,
    limit: int,
    cursor: str | None,
    metadata: dict[str, str] | None = None,
) -> RowPage[TrainingJob]:
    """A page of the user's jobs (everyone's for None), newest first; cursor: the last job id.
    `metadata`: only jobs whose metadata has each of these string values ({}: jobs without)."""
    query = select(TrainingJob)
    if user_id is not None:
        query = query.where(TrainingJob.user_id == user_id)
    if metadata == {}:  # stored as SQL NULL, or as JSON null / {} (the JSON type's None)
        text_form = cast(TrainingJob.meta, Text)
        query = query.where(or_(TrainingJob.meta.is_(None), text_form.in_(["null", "{}"])))
    for key, value in (metadata or {}).items():
        query = query.where(TrainingJob.meta[key].as_string() == value)
    if cursor is not None:
        after = session.get(TrainingJob, cursor)
        if after is None or (user_id is not None and after.user_id != user_id):
            raise BadRequest(
                "cursor: not a cursor returned by this API", "invalid_cursor", param="cursor"
            )
        query = query.where(
            tuple_(TrainingJob.created_at, TrainingJob.id) < tuple_(after.created_at, after.id)
        )
    query = query.order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc())
    return paginate(session, query, limit, cursor_of=lambda job: job.id)


def list_events(
    session: Session,
    user_id: str,
    job_id: str,
    limit: int,
    after: int | None,
    kind: str | None = None,
    *,
    newest_first: bool = False,
) -> RowPage[JobEvent]:
    """A page of the job's events, oldest first, after the event id `after`.

    Its cursor is always the last id seen (or `after` on an empty page), so a client polls a
    running job with `after=next_cursor` for what comes next. `newest_first` pages backwards
    (OpenAI's order): `after` is then the oldest id seen so far.
    """
    get_job(session, user_id, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id < after if newest_first else JobEvent.id > after)
    if kind is not None:
        query = query.where(JobEvent.kind == kind)
    query = query.order_by(JobEvent.id.desc() if newest_first else JobEvent.id)
    page: RowPage[JobEvent] = paginate(session, query, limit, cursor_of=lambda e: str(e.id))
    last = page.data[-1].id if page.data else after
    return RowPage(page.data, page.has_more, str(last) if last is not None else None)


def cancel_job(session: Session, user_id: str, job_id: str) -> TrainingJob:
    """Cancel now if queued; ask the worker to stop between steps if running; 409 if finished."""
    job = get_job(session, user_id, job_id)
    now = utcnow()
    queued = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.status == "queued")
        .values(status="cancelled", cancel_requested=True, phase=None, finished_at=now)
    )
    if rows_matched(queued):
        add_event(
            session, job_id, "status", {"status": "cancelled", "message": "cancelled while queued"}
        )
    else:
        running = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == "running")
            .values(cancel_requested=True)
        )
        if rows_matched(running):
            add_event(session, job_id, "status", {"message": "cancellation requested"})
    session.refresh(job)
    if job.status in ("succeeded", "failed"):
        raise Conflict(
            f"Training job {job_id!r} already {job.status}; it cannot be cancelled", "job_finished"
        )
    return job


# --- the job's log --------------------------------------------------------------------------------


def add_event(
    session: Session, job_id: str, kind: str, data: dict[str, Any], step: int | None = None
) -> None:
    """Append one event to a job's log."""
    session.add(JobEvent(job_id=job_id, kind=kind, step=step, data=data, created_at=utcnow()))
