"""`python -m app.embedded` (what `make run` calls): the whole service on one machine, no servers.

Starts three child processes sharing the environment (hence the settings): the API (`python -m
app`, which prints how to authenticate), a Celery worker (solo pool: one job at a time, queues
`gpu` and `default`) and Celery beat. With the defaults, the database and the broker are SQLite
files in DATA_DIR (kombu's SQLAlchemy transport). Ctrl-C or SIGTERM stops them all: the running job
stops at its next step and goes back to the queue; a second Ctrl-C kills at once. If one child
exits, the others are stopped too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from app.core.config import get_settings
from app.core.db import upgrade_to_head
from app.core.logging import configure_logging

log = logging.getLogger("app.embedded")
STOP_GRACE_S = 30.0
POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def child_commands(log_level: str) -> dict[str, list[str]]:
    """The command line of each child process."""
    celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
    return {
        "api": [sys.executable, "-m", "app"],
        "worker": [
            *celery,
            "worker",
            "-Q",
            "gpu,default",
            "--pool",
            "solo",
            "-n",
            "embedded@%h",
            "--loglevel",
            log_level,
        ],
        "beat": [*celery, "beat", "--loglevel", log_level],
    }


def _detach_and_die_with_parent() -> None:
    """In the child: own process group (Ctrl-C reaches only the parent), and SIGTERM if it dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Supervisor:
    """Runs the children, forwards stop signals, and stops everything when one of them exits."""

    commands: dict[str, list[str]]
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stop_requests: int = 0

    def start(self) -> None:
        """Start every child."""
        for name, command in self.commands.items():
            self.children[name] = subprocess.Popen(command, preexec_fn=_detach_and_die_with_parent)
            log.info("started %s (pid %d)", name, self.children[name].pid)

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: the first request stops gracefully, a second one kills."""
        self.stop_requests += 1
        if self.stop_requests > 1:
            self._send(signal.SIGKILL)

    def wait(self) -> int:
        """Block until a stop request or a child exit; then stop all and return an exit code."""
        exited: tuple[str, int] | None = None
        while self.stop_requests == 0 and exited is None:
            time.sleep(POLL_S)
            exited = next(
                ((n, c.returncode) for n, c in self.children.items() if c.poll() is not None), None
            )
        if exited is not None:
            log.error("%s exited with code %s; stopping the others", *exited)
        self.stop()
        return exited[1] or 1 if exited is not None else 0

    def stop(self) -> None:
        """SIGTERM every child, then SIGKILL whatever still runs after the grace period."""
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _send(self, signum: int) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)


def main() -> int:
    """Migrate (embedded database), start the children, and supervise them."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:  # once, before three processes race for it
        upgrade_to_head(settings.database_url)
    supervisor = Supervisor(child_commands(settings.log_level))
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    supervisor.start()
    log.info("worker and beat use the broker %s", settings.broker_url.split("@")[-1])
    return supervisor.wait()


if __name__ == "__main__":
    sys.exit(main())
