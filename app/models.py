"""ORM models. The schema itself is created only by Alembic migrations (migrations/versions)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ACTIVE_JOB_STATUSES = ("queued", "running")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: UTCDateTime(),
    }


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    active_adapter_version: Mapped[int | None] = mapped_column(Integer, default=None)
    # True after an explicit activation other than the newest version: publishing won't override.
    active_adapter_pinned: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(100), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written at most once a minute per key (app/services/api_keys.py), so accurate to a minute.
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class PreferencePair(Base):
    __tablename__ = "preference_pairs"
    __table_args__ = (Index("ix_preference_pairs_user_id_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    messages: Mapped[list[Any]] = mapped_column(JSON)
    # foundation.pairs.prompt_hash(messages), written with the row (indexed, for finding a prompt's
    # pairs in SQL). The worker does not read it back: the engine keys caches shared by all users
    # (base answers, reference log-probs) by this hash, so it computes it from the text it trains
    # on rather than trust a stored copy (a row written by hand or by an older writer).
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("user_id", "key", name="uq_idempotency_user_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingJob(Base):
    __tablename__ = "training_jobs"
    __table_args__ = (
        # At most one queued/running job per user, enforced by the database itself.
        Index(
            "uq_training_jobs_one_active_per_user",
            "user_id",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_training_jobs_user_id_created_at", "user_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    method: Mapped[str] = mapped_column(String(16), default="bapo")
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    trigger: Mapped[str] = mapped_column(String(16), default="api")
    pair_count: Mapped[int] = mapped_column(Integer, default=0)
    last_pair_id: Mapped[int | None] = mapped_column(Integer, default=None)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    adapter_version: Mapped[int | None] = mapped_column(Integer, default=None)
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # OpenAI's job `metadata` (string pairs given to POST /v1/fine_tuning/jobs).
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, default=None)
    # The stored file (`file-…`) whose pairs a fine-tuning job imported before it was created.
    training_file: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def gate(self) -> Any:
        """The retention gate's verdict in the final metrics (None until the gate has run)."""
        return (self.metrics or {}).get("gate")

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish (to now while it runs); None before it started."""
        if self.started_at is None:
            return None
        return ((self.finished_at or utcnow()) - self.started_at).total_seconds()


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default="step")
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("user_id", "version", name="uq_adapters_user_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text)  # relative to ADAPTER_DIR (old rows: absolute)
    job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    method: Mapped[str] = mapped_column(String(16), default="bapo")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    gate_passed: Mapped[bool] = mapped_column(Boolean, default=True)
    gate_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def gate(self) -> dict[str, Any] | None:
        """The gate's verdict and figures recorded in the metrics (None if none were)."""
        gate = (self.metrics or {}).get("gate")
        return gate if isinstance(gate, dict) and "passed" in gate else None


class AdapterVersionFloor(Base):
    """The highest adapter version ever issued for a user id.

    Raised whenever a version is issued; nothing lowers it (GC, user deletion), so the next
    version, and its serving name, is always new.
    """

    __tablename__ = "adapter_version_floors"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class BaseResponse(Base):
    """The base model's own answer to a prompt: keyed by (base model, prompt), not by user."""

    __tablename__ = "base_responses"

    cache_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    response: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReferenceLogprob(Base):
    """log π_ref(response | prompt) summed over response tokens, for a fixed base model."""

    __tablename__ = "reference_logprobs"

    cache_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    logprob: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


BASE_RESPONSE_CACHE = "base_response"
REFERENCE_LOGPROB_CACHE = "reference_logprob"
GATE_BASELINE_CACHE = "gate_baseline"  # the retention gate's base MC outcomes and judged answers
CACHE_NAMES = (BASE_RESPONSE_CACHE, REFERENCE_LOGPROB_CACHE, GATE_BASELINE_CACHE)


class CacheLookups(Base):
    """Hits and misses of one shared cache, summed over every job (operators only: /metrics)."""

    __tablename__ = "cache_lookups"

    cache: Mapped[str] = mapped_column(String(32), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    misses: Mapped[int] = mapped_column(BigInteger, default=0)


class StoredFile(Base):
    """A JSONL file of preference pairs uploaded through `/v1/files` (its bytes: `file_chunks`).

    In the database rather than on a disk so that every API replica sees it, it is stored in the
    same transaction as its row (no orphan or missing bytes), and deleting its user deletes it.
    """

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_user_id_created_at", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "file-" + 24 hex digits
    # The uploading key's user; None for a file the operator uploaded (the operator's own).
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), default=None
    )
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    pair_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FileChunk(Base):
    """One piece (up to 1 MiB) of a stored file, in order of `seq`."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class FeedbackImport(Base):
    """A JSONL file imported into a user's pairs: once per file content (sha256) and user."""

    __tablename__ = "feedback_imports"
    __table_args__ = (UniqueConstraint("user_id", "sha256", name="uq_feedback_imports_user_sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    pair_count: Mapped[int] = mapped_column(Integer)
    file_id: Mapped[str | None] = mapped_column(String(40), default=None)  # the file may go later
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
