"""The worker's Celery app, configured from Settings (the same env vars as the API).

Production (Redis broker), one training worker per GPU and one light worker for the periodic tasks:
    celery -A worker.celery_app worker -Q gpu --concurrency 1 -n gpu0@%h
    celery -A worker.celery_app worker -Q default -n default@%h
    celery -A worker.celery_app beat
Embedded (`make run`): app.embedded starts one solo worker on both queues and beat beside the API.

Delivery: acks_late + prefetch 1, so a message is acknowledged only after its job ended and a worker
holds at most the job it runs. task_reject_on_worker_lost puts a message back when a pool child
dies; the redelivered message then finds its job `running` and does nothing (the claim is a
conditional UPDATE), and the reaper requeues or fails the job once its heartbeat is stale. The
visibility timeout (Redis) is above the hard time limit, so a live run is never redelivered.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_shutting_down,
)

from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.core.middleware import request_id_var
from app.queue import TRAIN_TASK, make_celery
from worker.jobs import SHUTTING_DOWN, forget_engines, restore_sigterm, stop_job_on_sigterm
from worker.schedule import beat_schedule


def make_worker_app(settings: Settings) -> Celery:
    """The Celery app with the worker's delivery guarantees and the beat schedule."""
    celery = make_celery(settings, main="bapo")
    celery.conf.update(
        include=["worker.tasks"],
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,  # prefork: a fresh process (and GPU memory) per task
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    )
    return celery


settings = get_settings()
celery_app = make_worker_app(settings)
# Whether this process is a prefork pool child, and the SIGTERM handler its running job replaced.
_MAIN_PID = os.getpid()
_pool_child: dict[str, Any] = {"is": False}
app = celery_app  # what `celery -A worker.celery_app` looks for


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    """Worker and beat log like the API: JSON lines with the request id (LOG_JSON, LOG_LEVEL)."""
    configure_logging(settings.log_level, settings.log_json)


@task_prerun.connect
def _bind_request_id(task: Any = None, **_: Any) -> None:
    """Carry the request id of the API call that enqueued this task into the task's logs."""
    request_id = getattr(task.request, "request_id", None) if task is not None else None
    request_id_var.set(request_id if isinstance(request_id, str) else None)


@task_postrun.connect
def _unbind_request_id(**_: Any) -> None:
    request_id_var.set(None)


@worker_shutting_down.connect
def _stop_running_job(**_: Any) -> None:
    """Warm shutdown (sent in the main process only): the running job, in this process (solo
    pool) or in a pool child (prefork, which reads the same shared flag), stops at its next step
    and is requeued without using an attempt."""
    SHUTTING_DOWN.set()


@worker_process_init.connect
def _init_pool_child(**_: Any) -> None:
    """A forked pool child opens its own database connections. (The solo pool sends this signal
    too, in the main process: that one is no child.)"""
    forget_engines()
    _pool_child["is"] = os.getpid() != _MAIN_PID


@task_prerun.connect
def _sigterm_stops_the_job(task: Any = None, **_: Any) -> None:
    """In a pool child, while a training job runs, a SIGTERM sent to the child too (a whole process
    group: systemd, a terminal) stops the job like a warm shutdown. Installed per job because
    billiard sets its own handler after worker_process_init."""
    if _pool_child["is"] and task is not None and task.name == TRAIN_TASK:
        _pool_child["sigterm"] = stop_job_on_sigterm()


@task_postrun.connect
def _sigterm_as_before(**_: Any) -> None:
    if "sigterm" in _pool_child:
        restore_sigterm(_pool_child.pop("sigterm"))
