"""Celery tasks: thin, ids in, explicit names; the work is in worker.runner and worker.schedule."""

from __future__ import annotations

import os

from celery import Task

from app.queue import (
    HARD_LIMIT_GRACE_S,
    REAP_TASK,
    RETRAIN_TASK,
    SOFT_LIMIT_GRACE_S,
    TRAIN_TASK,
)
from worker import runner
from worker import schedule as ticks
from worker.celery_app import celery_app, settings
from worker.jobs import is_transient

MAINTENANCE_LIMIT_S = 300


@celery_app.task(
    name=TRAIN_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.job_time_limit_s + SOFT_LIMIT_GRACE_S,
    time_limit=settings.job_time_limit_s + HARD_LIMIT_GRACE_S,
)
def train_user(self: Task, job_id: str) -> str:
    """Run one training job; a duplicate or redelivered message finds it claimed and returns."""
    worker_id = f"{self.request.hostname}:{os.getpid()}"
    try:
        return runner.run_training_job(job_id, worker_id, settings)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # The database or broker did not answer while claiming or releasing: try again later.
        raise self.retry(
            exc=exc, countdown=settings.job_retry_delay_s, max_retries=settings.job_max_attempts
        ) from exc


@celery_app.task(name=RETRAIN_TASK, time_limit=MAINTENANCE_LIMIT_S)
def enqueue_due_retrains() -> list[str]:
    """Scheduler tick: jobs for the users due for retraining."""
    return ticks.enqueue_due_retrains(settings)


@celery_app.task(name=REAP_TASK, time_limit=MAINTENANCE_LIMIT_S)
def reap_stale_jobs() -> dict[str, list[str]]:
    """Reaper tick: requeue or fail jobs whose worker is gone."""
    return ticks.reap_stale_jobs(settings)
