"""Database engine, sessions and the migration check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings

log = logging.getLogger(__name__)
AFTER_COMMIT = "after_commit"
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def make_engine(settings: Settings) -> Engine:
    """Create the SQLAlchemy engine for the configured database."""
    url = settings.database_url
    if settings.is_sqlite:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Enforce foreign keys and let readers and one writer work side by side."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that never expire loaded objects on commit (responses are built after commit)."""
    return sessionmaker(engine, expire_on_commit=False, autoflush=False)


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` after the session's transaction commits (e.g. enqueue a job, delete files)."""
    session.info.setdefault(AFTER_COMMIT, []).append(callback)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error. Used at request/task boundaries.

    Callbacks registered with `after_commit` run after a successful commit, in order; a failing
    callback is logged and does not undo the committed transaction.
    """
    session = factory()
    try:
        yield session
    except BaseException:
        end_transaction(session, failed=True)
        raise
    end_transaction(session, failed=False)


def end_transaction(session: Session, failed: bool) -> None:
    """Commit (roll back if `failed`, or if the commit fails) and close the session; after a
    successful commit, run its `after_commit` callbacks."""
    committed = False
    try:
        if failed:
            session.rollback()
        else:
            session.commit()
            committed = True
    except BaseException:
        session.rollback()
        raise
    finally:
        callbacks = session.info.pop(AFTER_COMMIT, [])
        session.close()
        if committed:
            _run_callbacks(callbacks)


def has_pending_work(session: Session) -> bool:
    """Whether ending the session's transaction needs the database or callbacks (else it is a
    no-op that needs no thread)."""
    return session.in_transaction() or bool(session.info.get(AFTER_COMMIT))


def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the commit stands; the callback's owner must cope (e.g. a reaper)
            log.exception("after-commit callback failed")


def rows_matched(result: Any) -> int:
    """Rows an UPDATE or DELETE matched (a typed accessor: `Result` does not declare rowcount)."""
    return int(getattr(result, "rowcount", 0) or 0)


def alembic_config(database_url: str) -> Any:
    """An Alembic config pointing at our migrations and the given database."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str) -> None:
    """Apply every migration (what `alembic upgrade head` does)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")


def migration_state(engine: Engine) -> tuple[str | None, str]:
    """(current revision of the database, head revision of the code)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    head = script.get_current_head() or ""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None, head
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head
