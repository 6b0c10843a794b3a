"""Periodic work on jobs: pick users due for retraining, reap jobs whose worker is gone.

Nothing here commits; the Celery beat tasks (worker/schedule.py) are the transaction boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy import ColumnElement, Subquery, case, exists, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import after_commit
from app.core.errors import AppError
from app.models import ACTIVE_JOB_STATUSES, PreferencePair, TrainingJob, utcnow
from app.queue import enqueue_training, training_messages
from app.services import job_leases
from app.services import jobs as job_service
from foundation.adapter_store import AdapterStore

log = logging.getLogger(__name__)
RESEND_BATCH = 100  # most lost messages one reaper pass re-sends


def due_users(session: Session, settings: Settings, limit: int) -> list[str]:
    """Up to `limit` users due for retraining, oldest un-trained feedback first.

    Due: at least retrain_min_new_pairs pairs newer than the last succeeded job's last_pair_id,
    at least min_pairs_to_train pairs in all, no queued/running job, and at least one pair that no
    failed or cancelled job has already tried (a failing user is not retried every tick).
    """
    trained = _last_pair_seen(("succeeded",))
    tried = _last_pair_seen(("failed", "cancelled"))
    floor = func.coalesce(trained.c.last_pair_id, 0)
    is_new = PreferencePair.id > floor
    busy = exists().where(
        TrainingJob.user_id == PreferencePair.user_id, TrainingJob.status.in_(ACTIVE_JOB_STATUSES)
    )
    query = (
        select(PreferencePair.user_id)
        .outerjoin(trained, trained.c.user_id == PreferencePair.user_id)
        .outerjoin(tried, tried.c.user_id == PreferencePair.user_id)
        .where(~busy)
        .group_by(PreferencePair.user_id, trained.c.last_pair_id, tried.c.last_pair_id)
        .having(func.sum(case((is_new, 1), else_=0)) >= settings.retrain_min_new_pairs)
        .having(func.count() >= settings.min_pairs_to_train)
        .having(func.max(PreferencePair.id) > func.coalesce(tried.c.last_pair_id, 0))
        .order_by(func.min(case((is_new, PreferencePair.id))), PreferencePair.user_id)
        .limit(limit)
    )
    return list(session.scalars(query)) if limit > 0 else []


def _last_pair_seen(statuses: tuple[str, ...]) -> Subquery:
    """Per user, the newest last_pair_id of their jobs that ended with one of `statuses`."""
    return (
        select(TrainingJob.user_id, func.max(TrainingJob.last_pair_id).label("last_pair_id"))
        .where(TrainingJob.status.in_(statuses))
        .group_by(TrainingJob.user_id)
        .subquery()
    )


def queue_room(session: Session, settings: Settings) -> int:
    """How many more jobs may be queued before the queue holds retrain_max_queued."""
    queued = session.scalar(select(func.count()).where(TrainingJob.status == "queued")) or 0
    return max(settings.retrain_max_queued - int(queued), 0)


def enqueue_due_retrains(session: Session, settings: Settings, batch: int) -> list[str]:
    """Create a `schedule` job for up to `batch` due users, oldest feedback first, without
    filling the queue past retrain_max_queued (each enqueued after commit); their ids."""
    created = []
    for user_id in due_users(session, settings, min(batch, queue_room(session, settings))):
        try:
            job, is_new = job_service.start_job(session, settings, user_id, trigger="schedule")
        except AppError:  # e.g. the user was deleted meanwhile: skip, the next tick sees it again
            continue
        if is_new:
            created.append(job.id)
    return created


@dataclass
class ReapReport:
    """What one reaper pass did."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


def reap_stale_jobs(
    session: Session, settings: Settings, now: datetime | None = None
) -> ReapReport:
    """Requeue (or fail) running jobs without a heartbeat; re-send lost messages of queued ones.

    A running job's heartbeat older than job_stale_after_s means its worker is gone (killed, lost
    its connection). Each change is a conditional UPDATE, so a worker that beats meanwhile wins.
    """
    now = now or utcnow()
    report = ReapReport()
    stale_before = now - timedelta(seconds=settings.job_stale_after_s)
    stale = session.scalars(
        select(TrainingJob).where(
            TrainingJob.status == "running", TrainingJob.heartbeat_at < stale_before
        )
    )
    for job in list(stale):
        _reap_one(session, settings, job, stale_before, report)
    _resend_lost(session, settings, now, report)
    return report


def _reap_one(
    session: Session,
    settings: Settings,
    job: TrainingJob,
    stale_before: datetime,
    report: ReapReport,
) -> None:
    """Decide for one stale job: cancelled (if asked), requeued, or failed (out of attempts)."""
    claim = job_leases.Claim(job.id, job.user_id, job.attempts, job.worker_id or "")
    stale_for = settings.job_stale_after_s
    if job.cancel_requested:
        done = job_leases.finish_job(session, claim, "cancelled")
        outcome, bucket = ("cancelled" if done else "lost"), report.cancelled
    else:
        still_stale = TrainingJob.heartbeat_at < stale_before
        if not _still_matches(session, claim, still_stale):
            return
        reason = (
            f"worker {job.worker_id} lost (no heartbeat for {stale_for}s) in attempt {job.attempts}"
        )
        outcome = job_leases.release_job(session, settings, claim, reason)
        bucket = report.requeued if outcome == "queued" else report.failed
    if outcome != "lost":
        bucket.append(job.id)
        _clean_staging_after_commit(session, settings.adapter_store, claim)


def _still_matches(
    session: Session, claim: job_leases.Claim, condition: ColumnElement[bool]
) -> bool:
    """Lock the job row if it is still running this attempt and `condition` holds."""
    row = session.scalar(
        select(TrainingJob.id)
        .where(*job_leases.fence(claim), condition)
        .with_for_update(skip_locked=True)
    )
    return row is not None


def _clean_staging_after_commit(
    session: Session, store: AdapterStore, claim: job_leases.Claim
) -> None:
    """Delete the attempt's staging folder once its release or end is committed."""
    staging = store.staging_folder(claim.user_id, claim.job_id, claim.attempt)
    after_commit(session, lambda: store.remove_staging(staging))


def _resend_lost(session: Session, settings: Settings, now: datetime, report: ReapReport) -> None:
    """Re-send the message of queued jobs idle for job_resend_after_s whose message the broker
    no longer holds (lost at enqueue, Redis restarted without it, consumer died), oldest first,
    at most RESEND_BATCH per pass. A job merely waiting its turn keeps its one message."""
    idle_before = now - timedelta(seconds=settings.job_resend_after_s)
    last_sign = func.coalesce(TrainingJob.heartbeat_at, TrainingJob.created_at)
    is_idle = (TrainingJob.status == "queued", last_sign < idle_before)
    idle = session.scalars(
        select(TrainingJob.id).where(*is_idle).order_by(last_sign, TrainingJob.id)
    ).all()
    if not idle:
        return
    try:
        held = training_messages(settings, delivered_since=idle_before.timestamp())
    except (redis.exceptions.RedisError, OSError) as exc:  # sending would fail too: next pass
        log.warning("reaper: cannot list the broker's messages, nothing re-sent: %s", exc)
        return
    lost = [job_id for job_id in idle if held is None or job_id not in held][:RESEND_BATCH]
    if not lost:
        return
    marked = set(
        session.scalars(
            update(TrainingJob)
            .where(TrainingJob.id.in_(lost), *is_idle)
            .values(heartbeat_at=now)
            .returning(TrainingJob.id)
        )
    )
    for job_id in (job_id for job_id in lost if job_id in marked):
        enqueue_training(session, settings, job_id)
        report.resent.append(job_id)
