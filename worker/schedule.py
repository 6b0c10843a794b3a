"""Celery beat: what runs periodically, and the ticks themselves (one transaction each)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from app.core.config import Settings
from app.core.db import transaction
from app.queue import DEFAULT_QUEUE, REAP_TASK, RETRAIN_TASK
from app.services import schedule as schedule_service
from worker.jobs import session_factory

log = logging.getLogger(__name__)
SCHEDULE_BATCH = 200  # users admitted per transaction of a scheduler tick


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks; a tick that waits longer than its interval expires (no pile-up)."""
    return {
        "retrain-due-users": _entry(RETRAIN_TASK, settings.retrain_interval_s),
        "reap-stale-jobs": _entry(REAP_TASK, settings.reaper_interval_s),
    }


def _entry(task: str, every_s: int) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": float(every_s),
        "options": {"queue": DEFAULT_QUEUE, "expires": float(every_s)},
    }


def enqueue_due_retrains(settings: Settings) -> list[str]:
    """One scheduler tick: jobs for every due user up to the queue-depth limit; their job ids.

    Batches of SCHEDULE_BATCH users, one transaction each, so a tick that admits thousands sends
    the first messages early and keeps what it did if it is interrupted.
    """
    job_ids: list[str] = []
    while True:
        with transaction(session_factory(settings)) as session:
            batch = schedule_service.enqueue_due_retrains(session, settings, SCHEDULE_BATCH)
        job_ids += batch
        if len(batch) < SCHEDULE_BATCH:  # nobody else due, or the queue is full
            break
    if job_ids:
        log.info("scheduled %d retraining job(s)", len(job_ids))
    return job_ids


def reap_stale_jobs(settings: Settings) -> dict[str, list[str]]:
    """One reaper tick: requeue or fail jobs whose worker is gone; re-send idle queued jobs."""
    with transaction(session_factory(settings)) as session:
        report = schedule_service.reap_stale_jobs(session, settings)
    if any(asdict(report).values()):
        log.warning("reaper: %s", asdict(report))
    return asdict(report)
