"""The worker's hold on one claimed job: fenced writes, the heartbeat, and the engine's callbacks.

Every write goes through the claim fence (see app.services.job_leases); when a write matches
nothing the job was taken away (reaped, user deleted) and the run stops at the next step without
publishing.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis.exceptions
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker, transaction
from app.services import job_leases
from app.services.job_leases import Claim, JobSignals

log = logging.getLogger(__name__)

# Infrastructure errors worth retrying: the database or the broker did not answer.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)
# Test-only hook, off unless this variable names a file: see hold_for_tests.
PAUSE_FILE_ENV = "BAPO_TEST_PAUSE_FILE"
_FACTORIES: dict[str, sessionmaker[Session]] = {}
_FACTORIES_LOCK = threading.Lock()


class ShutdownFlag:
    """Set when the worker starts a warm shutdown: the running job stops and goes back to the queue.

    Celery tells only its main process (worker_shutting_down), while the prefork pool runs the job
    in a child. The flag is one byte of shared memory made at import, before the pool forks, so
    the main process's set() is what the child's is_set() reads. No lock: a process killed while
    touching it cannot leave it held. set_here() is for one process only (a child's SIGTERM).
    """

    def __init__(self) -> None:
        self._shared = multiprocessing.RawValue(ctypes.c_bool, False)
        self._here = False

    def set(self) -> None:
        """Ask every process of this worker to stop its job at the next step."""
        self._shared.value = True

    def set_here(self) -> None:
        """Ask this process only (safe in a signal handler: no lock, no allocation)."""
        self._here = True

    def clear_here(self) -> None:
        """Forget what set_here() asked, once this process's job has stopped."""
        self._here = False

    def is_set(self) -> bool:
        """True once a warm shutdown has begun."""
        return self._here or bool(self._shared.value)


SHUTTING_DOWN = ShutdownFlag()


def stop_job_on_sigterm() -> Any:
    """In a pool child running a job: the first SIGTERM stops the job at its next step (and
    requeues it) instead of exiting mid-step; a second one gets the handler from before (billiard
    exits the child). Returns that handler, for restore_sigterm after the job.

    Only this process is told: billiard also sends a lone child SIGTERM (hard time limit, before
    SIGKILL), and that must not stop the worker's later jobs.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        SHUTTING_DOWN.set_here()
        signal.signal(signal.SIGTERM, previous)

    signal.signal(signal.SIGTERM, on_sigterm)
    return previous


def restore_sigterm(previous: Any) -> None:
    """After the job: put back the SIGTERM handler stop_job_on_sigterm replaced; a stop that
    SIGTERM asked for has been done (the job went back to the queue), so the next job runs."""
    signal.signal(signal.SIGTERM, previous)
    SHUTTING_DOWN.clear_here()


def is_transient(exc: BaseException) -> bool:
    """True for a lost database/broker connection (retry), False for anything else (fail)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, TRANSIENT_ERRORS)


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """This process's sessionmaker for the configured database (made on first use, after fork)."""
    with _FACTORIES_LOCK:
        if settings.database_url not in _FACTORIES:
            _FACTORIES[settings.database_url] = make_sessionmaker(make_engine(settings))
        return _FACTORIES[settings.database_url]


def forget_engines() -> None:
    """Drop engines inherited over a fork (a child must open its own connections)."""
    with _FACTORIES_LOCK:
        _FACTORIES.clear()


def finite(value: Any) -> Any:
    """JSON-safe metrics: NaN/inf become None (Postgres' JSON refuses them), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def hold_for_tests(phase: str) -> None:
    """Test-only: while the file named by BAPO_TEST_PAUSE_FILE holds this phase's name, wait here
    (the phase is recorded and the heartbeat goes on), so a test can kill -9 the worker in a known
    phase (tests/integration/test_jobs_crash.py). Does nothing when the variable is unset."""
    path = os.environ.get(PAUSE_FILE_ENV)
    while path and _read_text(Path(path)) == phase:
        time.sleep(0.1)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class JobStopped(Exception):
    """The run must stop now (cancel requested, claim lost, time limit, shutdown)."""


class RunningJob:
    """One claimed job as the runner drives it."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings, claim: Claim) -> None:
        self.factory = factory
        self.settings = settings
        self.claim = claim
        self.deadline = time.monotonic() + settings.job_time_limit_s
        self.total_steps = 0
        self.lost = False
        self.cancel_requested = False

    def _write(self, change: Callable[[Session], JobSignals | None]) -> None:
        """Apply one fenced change in its own short transaction and note what it says."""
        with transaction(self.factory) as session:
            signals = change(session)
        if signals is None:
            self.lost = True
        elif signals.cancel_requested:
            self.cancel_requested = True

    def on_phase(self, phase: str) -> None:
        """Engine callback: record the phase, then stop here if asked to."""
        self._write(lambda s: job_leases.record_phase(s, self.claim, phase))
        self.check_stop()
        hold_for_tests(phase)

    def on_step(self, record: dict[str, Any]) -> None:
        """Engine callback: one training step's metrics → a job event + progress."""
        step = int(record.get("step", 0))
        progress = step / self.total_steps if self.total_steps else 0.0
        metrics = finite(record)
        self._write(lambda s: job_leases.record_step(s, self.claim, step, metrics, progress))

    def beat(self) -> None:
        """Write the heartbeat (and learn about cancellation)."""
        self._write(lambda s: job_leases.heartbeat(s, self.claim))

    def stop_reason(self) -> str | None:
        """Why the run must stop, or None: lost > cancelled > time limit > shutdown."""
        if self.lost:
            return "lost"
        if self.cancel_requested:
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "time_limit"
        return "shutdown" if SHUTTING_DOWN.is_set() else None

    def should_stop(self) -> bool:
        """Engine callback, checked between steps."""
        return self.stop_reason() is not None

    def check_stop(self) -> None:
        """Raise JobStopped when the run must stop."""
        reason = self.stop_reason()
        if reason is not None:
            raise JobStopped(reason)

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Beat every job_heartbeat_s in a thread while the block runs."""
        done = threading.Event()
        thread = threading.Thread(
            target=self._beat_until,
            args=(done,),
            daemon=True,
            name=f"heartbeat-{self.claim.job_id}",
        )
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=10)

    def _beat_until(self, done: threading.Event) -> None:
        while not done.wait(self.settings.job_heartbeat_s):
            try:
                self.beat()
            except TRANSIENT_ERRORS as exc:  # the reaper acts if this lasts job_stale_after_s
                log.warning("heartbeat of job %s failed: %s", self.claim.job_id, exc)
