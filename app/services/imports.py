"""Importing a JSONL file of preference pairs into a user's feedback.

All or nothing: pairs are inserted in batches inside a savepoint while the file streams in, and
the savepoint is rolled back if any line is bad. Once per file content: the same bytes (sha256)
imported again for the same user store nothing new and report the first import. Never commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from app.core.config import Settings, get_settings
from app.core.security import Principal
from app.models import FeedbackImport, PreferencePair
from app.services import files as file_service
from app.services import users as user_service
from app.services.feedback import pair_values
from app.services.jsonl import JsonlPairs
from foundation.pairs import Pair

BATCH_PAIRS = 500
BATCH_BYTES = 256 * 1024


@dataclass(frozen=True)
class ImportReport:
    """What an import did: `created` pairs stored now (0 when `already_imported`)."""

    id: int
    user_id: str
    sha256: str
    pairs: int
    created: int
    already_imported: bool
    file_id: str | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """The API form (JSON-ready)."""
        return {
            "object": "feedback.import",
            "id": self.id,
            "user_id": self.user_id,
            "sha256": self.sha256,
            "pairs": self.pairs,
            "created": self.created,
            "already_imported": self.already_imported,
            "file_id": self.file_id,
            "created_at": self.created_at.isoformat(),
        }


class PairImport:
    """One import of a file fed chunk by chunk: `feed()` each chunk, then `finish()`."""

    def __init__(
        self, session: Session, user_id: str, settings: Settings, file_id: str | None = None
    ) -> None:
        self.session, self.user_id, self.file_id = session, user_id, file_id
        self.reader = JsonlPairs(settings.pair_limits, settings.max_body_bytes, self._add)
        self._rows: list[dict[str, Any]] = []
        self._batch_bytes = 0
        self._created = 0
        self._savepoint: SessionTransaction = session.begin_nested()

    def feed(self, chunk: bytes) -> None:
        """Read the next bytes; full batches of good pairs are inserted (in the savepoint)."""
        self.reader.feed(chunk)

    def finish(self, param: str = "body") -> ImportReport:
        """Store the rest, or roll back everything and raise a 400 listing the bad lines."""
        try:
            self.reader.finish(param)
            self._flush()
            record = FeedbackImport(
                user_id=self.user_id,
                sha256=self.reader.sha256,
                pair_count=self._created,
                file_id=self.file_id,
            )
            self.session.add(record)
            self.session.flush()
        except IntegrityError:  # the same file was imported meanwhile (and has committed)
            self._savepoint.rollback()
            return _already(self.session, self.user_id, self.reader.sha256)
        except BaseException:
            self.abort()
            raise
        self._savepoint.commit()
        return _report(record, created=self._created)

    def abort(self) -> None:
        """Drop whatever this import inserted."""
        if self._savepoint.is_active:
            self._savepoint.rollback()

    def _add(self, pair: Pair, size: int) -> None:
        self._rows.append(pair_values(self.user_id, pair))
        self._batch_bytes += size
        if len(self._rows) >= BATCH_PAIRS or self._batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            # A Core-style bulk insert: the session keeps no object per pair.
            self.session.execute(insert(PreferencePair), self._rows)
            self._created += len(self._rows)
        self._rows, self._batch_bytes = [], 0


def import_chunks(
    session: Session, user_id: str, chunks: Iterable[bytes], settings: Settings
) -> ImportReport:
    """Import a file given as an iterable of byte chunks (see PairImport)."""
    job = PairImport(session, user_id, settings)
    try:
        for chunk in chunks:
            job.feed(chunk)
    except BaseException:
        job.abort()
        raise
    return job.finish()


def import_file(
    session: Session,
    user_id: str,
    file_id: str,
    principal: Principal,
    settings: Settings | None = None,
) -> ImportReport:
    """Import a stored file's pairs into the user's feedback, once: a second call adds nothing.

    NotFound for an unknown user or file, Forbidden for a file or user the principal may not use,
    400 (LinesRefused) with the bad lines if the file no longer passes, storing nothing then.
    """
    principal.authorize_user(user_id)
    user_service.get_user(session, user_id)
    stored = file_service.get_file(session, file_id, principal)
    earlier = _find(session, user_id, stored.sha256)
    if earlier is not None:
        return _report(earlier, created=0)
    job = PairImport(session, user_id, settings or get_settings(), file_id=stored.id)
    try:
        for chunk in file_service.file_chunks(session, stored.id):
            job.feed(chunk)
    except BaseException:
        job.abort()
        raise
    return job.finish(param="training_file")


def _find(session: Session, user_id: str, sha256: str) -> FeedbackImport | None:
    return session.scalar(
        select(FeedbackImport).where(
            FeedbackImport.user_id == user_id, FeedbackImport.sha256 == sha256
        )
    )


def _already(session: Session, user_id: str, sha256: str) -> ImportReport:
    earlier = _find(session, user_id, sha256)
    assert earlier is not None  # the unique constraint refused our record because of it
    return _report(earlier, created=0)


def _report(record: FeedbackImport, created: int) -> ImportReport:
    return ImportReport(
        id=record.id,
        user_id=record.user_id,
        sha256=record.sha256,
        pairs=record.pair_count,
        created=created,
        already_imported=created == 0,
        file_id=record.file_id,
        created_at=record.created_at,
    )
