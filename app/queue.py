"""The task queue as the API sees it: task names, queues, broker options, enqueue after commit.

The API sends tasks by NAME and never imports the worker (nor torch). Every message carries only a
job id; the worker re-reads the row and claims it, so a message sent twice is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from functools import lru_cache
from typing import Any

import redis
from celery import Celery
from kombu import Connection
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import after_commit
from app.core.middleware import request_id_var

log = logging.getLogger(__name__)

TRAIN_TASK = "bapo.train_user"
RETRAIN_TASK = "bapo.enqueue_due_retrains"
REAP_TASK = "bapo.reap_stale_jobs"
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"
# Seconds past job_time_limit_s: the cooperative deadline fires first, then Celery's soft limit,
# then the hard kill; the broker redelivers an unacknowledged message only after all of them.
SOFT_LIMIT_GRACE_S = 120
HARD_LIMIT_GRACE_S = 300
VISIBILITY_MARGIN_S = 900
BROKER_CHECK_TIMEOUT_S = 2.0


def visibility_timeout_s(settings: Settings) -> int:
    """Broker visibility timeout: above the longest run a training task may take."""
    return settings.job_time_limit_s + HARD_LIMIT_GRACE_S + VISIBILITY_MARGIN_S


def is_sql_broker(broker_url: str) -> bool:
    """True for kombu's SQLAlchemy transport (the embedded, server-less broker)."""
    return broker_url.startswith(("sqla+", "sqlalchemy+"))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options: a visibility timeout for Redis; a busy timeout for the SQLite broker."""
    if is_sql_broker(settings.broker_url):
        # kombu passes these to create_engine(); SQLite waits for the lock instead of failing.
        return {"connect_args": {"timeout": 30}} if "sqlite" in settings.broker_url else {}
    return {"visibility_timeout": visibility_timeout_s(settings)}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API (a producer) and the worker."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend or None,
        "task_ignore_result": not settings.result_backend,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": GPU_QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_publish_retry_policy": publish_retry_policy(),
        # The SQLAlchemy transport has no fanout exchange: no remote control (nor mingle/gossip).
        "worker_enable_remote_control": not is_sql_broker(settings.broker_url),
    }


def make_celery(settings: Settings, main: str = "bapo") -> Celery:
    """A Celery app configured for these settings."""
    celery = Celery(main, set_as_current=False)
    celery.conf.update(celery_config(settings))
    return celery


@lru_cache(maxsize=8)
def _producer(broker_url: str, transport_options_json: str) -> Celery:
    """One producer app per broker and options (cached: it holds a connection pool)."""
    celery = Celery("bapo-producer", set_as_current=False)
    celery.conf.update(
        broker_url=broker_url,
        broker_transport_options=json.loads(transport_options_json),
        task_ignore_result=True,
        task_serializer="json",
        task_publish_retry_policy=publish_retry_policy(),
    )
    return celery


def publish_retry_policy() -> dict[str, float]:
    """How long a publish keeps retrying a broker that does not answer (about 1.5 s)."""
    return {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def producer(settings: Settings) -> Celery:
    """The Celery app used to send tasks for these settings."""
    options = json.dumps(broker_transport_options(settings), sort_keys=True)
    return _producer(settings.broker_url, options)


def send_training(settings: Settings, job_id: str, countdown: float | None = None) -> None:
    """Send the training task for one job now (in a transaction, use enqueue_training)."""
    # The request id travels in a message header, so the worker's logs about this job carry it.
    headers = {"request_id": request_id_var.get()}
    producer(settings).send_task(
        TRAIN_TASK, args=[job_id], queue=GPU_QUEUE, countdown=countdown, headers=headers
    )
    log.info("sent %s for job %s", TRAIN_TASK, job_id)


def enqueue_training(
    session: Session, settings: Settings, job_id: str, countdown: float | None = None
) -> None:
    """Send the training task once the session's transaction has committed."""
    after_commit(session, lambda: send_training(settings, job_id, countdown))


def training_messages(settings: Settings, delivered_since: float) -> set[str] | None:
    """Job ids of the training messages the broker holds: waiting in the queue, or delivered at
    or after `delivered_since` (epoch seconds) and not yet acknowledged. A delivery older than
    that whose job is still queued had a consumer that died before claiming it, so it does not
    count. None when the broker cannot be listed (only Redis can); raises if it does not answer.
    """
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(
        settings.broker_url,
        socket_timeout=BROKER_CHECK_TIMEOUT_S,
        socket_connect_timeout=BROKER_CHECK_TIMEOUT_S,
    )
    try:
        with client.pipeline(transaction=True) as pipe:  # one consistent snapshot
            for name in _redis_queue_keys(GPU_QUEUE):
                pipe.lrange(name, 0, -1)
            pipe.hgetall(RedisChannel.unacked_key)
            pipe.zrange(RedisChannel.unacked_index_key, delivered_since, "+inf", byscore=True)
            *waiting, unacked, recent = pipe.execute()
    finally:
        client.close()
    entries = [raw for queue in waiting for raw in queue]
    entries += [unacked[tag] for tag in recent if tag in unacked]
    return {job_id for job_id in map(_training_job_id, entries) if job_id is not None}


def _redis_queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps one queue in (one per priority step)."""
    sep = RedisChannel.sep
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in PRIORITY_STEPS]


def _training_job_id(entry: bytes) -> str | None:
    """The job id a kombu Redis entry (a Celery protocol 2 message, or an unacknowledged one as
    [message, exchange, routing key]) carries, if it is a training message."""
    try:
        payload = json.loads(entry)
        if isinstance(payload, list):
            payload = payload[0]
        if payload["headers"]["task"] != TRAIN_TASK:
            return None
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        job_id = json.loads(body)[0][0]
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error):
        return None  # not a message this service sent
    return job_id if isinstance(job_id, str) else None


def broker_reachable(settings: Settings) -> tuple[bool, str]:
    """Connect to the broker once, without retrying; (ok, detail)."""
    try:
        if is_sql_broker(settings.broker_url):
            _probe_sql_broker(settings.broker_url)
        else:
            with Connection(settings.broker_url, connect_timeout=BROKER_CHECK_TIMEOUT_S) as conn:
                conn.ensure_connection(max_retries=1, timeout=BROKER_CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure means "not ready"; the detail names it
        return False, f"unreachable: {type(exc).__name__}: {exc}"[:200]
    return True, "ok"


def _probe_sql_broker(broker_url: str) -> None:
    """Open the broker's database (kombu's virtual channel would connect lazily) and query it."""
    url = broker_url.split("+", 1)[1]
    timeout = {"timeout": 2} if url.startswith("sqlite") else {"connect_timeout": 2}
    engine = create_engine(url, connect_args=timeout)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def broker_check(settings: Settings) -> Any:
    """A /readyz check: the broker accepts a connection."""

    async def check() -> tuple[bool, str]:
        return await asyncio.to_thread(broker_reachable, settings)

    return check
