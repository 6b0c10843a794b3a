"""Preference pairs: validation, idempotent storage, paging, deletion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import BadRequest, Conflict, InvalidRequest, NotFound
from app.models import IdempotencyRecord, PreferencePair, utcnow
from app.schemas.feedback import OpenAIPreferenceIn, PairBatchIn, PairIn
from app.services.pagination import RowPage, paginate
from foundation.pairs import (
    Pair,
    PairError,
    PairFields,
    PairLimits,
    check_pair,
    pair_from_dict,
    prompt_hash,
)


@dataclass(frozen=True)
class StoredResult:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def normalize(body: PairIn | OpenAIPreferenceIn | PairBatchIn, settings: Settings) -> list[Pair]:
    """Turn any accepted feedback shape into checked pairs, or raise a 4xx naming the field."""
    items = body.pairs if isinstance(body, PairBatchIn) else [body]
    if len(items) > settings.max_batch_pairs:
        raise InvalidRequest(
            f"pairs: at most {settings.max_batch_pairs} pairs per request",
            "batch_too_large",
            param="pairs",
        )
    prefix = "pairs." if isinstance(body, PairBatchIn) else ""
    try:
        return [
            _normalize_one(item, f"{prefix}{i}." if prefix else "", settings.pair_limits)
            for i, item in enumerate(items)
        ]
    except PairError as exc:
        raise InvalidRequest(str(exc), exc.code, param=exc.field) from exc


def _normalize_one(item: PairIn | OpenAIPreferenceIn, where: str, limits: PairLimits) -> Pair:
    """One pair of either shape, checked by the one pair validator (foundation.pairs)."""
    if isinstance(item, OpenAIPreferenceIn):
        return _normalize_openai(item, where, limits)
    if item.prompt is not None:
        messages = [{"role": "user", "content": item.prompt}]
    else:
        messages = [m.model_dump() for m in item.messages or []]
    fields = PairFields("prompt", prompt_text=True) if item.prompt is not None else PairFields()
    pair = Pair(messages, item.chosen, item.rejected, item.metadata)
    return check_pair(pair, limits, fields.under(where))


def _normalize_openai(item: OpenAIPreferenceIn, where: str, limits: PairLimits) -> Pair:
    """OpenAI's preference line, read as every other way in reads it (foundation.pairs)."""
    return pair_from_dict(item.model_dump(exclude_none=True), limits, where)


def request_fingerprint(pairs: list[Pair]) -> str:
    """Hash of the normalized request, to tell a true retry from a reused key."""
    raw = json.dumps([p.__dict__ for p in pairs], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


# The ingestion statements, built once: built per request (and through the ORM) they took about
# twice the CPU time of the whole store. Core tables: the session keeps no object per row.
_PAIRS = cast(Table, PreferencePair.__table__)
_RECORDS = cast(Table, IdempotencyRecord.__table__)
_INSERT_PAIRS = insert(_PAIRS).returning(_PAIRS.c.id, sort_by_parameter_order=True)
_CLAIM_KEY = {  # INSERT ... ON CONFLICT (user_id, key) DO NOTHING RETURNING id, per dialect
    "postgresql": postgresql.insert(_RECORDS)
    .on_conflict_do_nothing(index_elements=["user_id", "key"])
    .returning(_RECORDS.c.id),
    "sqlite": sqlite.insert(_RECORDS)
    .on_conflict_do_nothing(index_elements=["user_id", "key"])
    .returning(_RECORDS.c.id),
}
_READ_CLAIM = select(_RECORDS.c.request_hash, _RECORDS.c.status_code, _RECORDS.c.response).where(
    _RECORDS.c.user_id == bindparam("user_id"), _RECORDS.c.key == bindparam("key")
)
_SAVE_RESPONSE = (
    update(_RECORDS)
    .where(_RECORDS.c.id == bindparam("claim_id"))
    .values(response=bindparam("response"))
)


def store_pairs(
    session: Session, user_id: str, pairs: list[Pair], idempotency_key: str | None
) -> StoredResult:
    """Store pairs once per idempotency key; a retry with the same key replays the first result.

    Statements: one multi-row INSERT of the pairs; with a key, before it one INSERT ... ON CONFLICT
    DO NOTHING claiming the key (a retry reads the claim instead and stores nothing) and after it
    one UPDATE writing the response into the claim. The user must exist (NotFound otherwise).
    """
    claim_id = None
    if idempotency_key is not None:
        claim = _claim_key(session, user_id, idempotency_key, request_fingerprint(pairs))
        if isinstance(claim, StoredResult):
            return claim
        claim_id = claim
    body = _insert_pairs(session, user_id, pairs)
    if claim_id is not None:
        session.execute(_SAVE_RESPONSE, {"claim_id": claim_id, "response": body})
    return StoredResult(201, body, replayed=False)


def _insert_pairs(session: Session, user_id: str, pairs: list[Pair]) -> dict[str, Any]:
    """Insert the pairs in one statement; the 201 body is built from the values sent (no reads)."""
    created_at = utcnow()
    rows = [_pair_columns(user_id, p, created_at) for p in pairs]
    with _user_must_exist(user_id):
        ids = session.execute(_INSERT_PAIRS, rows).scalars().all()
    stored = [_api_pair(pair_id, row) for pair_id, row in zip(ids, rows, strict=True)]
    return {"object": "list", "created": len(stored), "pairs": stored}


def _claim_key(session: Session, user_id: str, key: str, fingerprint: str) -> StoredResult | int:
    """Either the earlier result for this key, or the id of a fresh record reserving the key.

    On Postgres a concurrent request holding the key makes the INSERT wait for its commit (then it
    conflicts, and the record read next is complete) or its rollback (then this one claims it).
    SQLite has one writer at a time, so the same holds.
    """
    if not key or len(key) > 255:
        raise BadRequest(
            "Idempotency-Key: 1 to 255 characters",
            "invalid_idempotency_key",
            param="Idempotency-Key",
        )
    values = {"user_id": user_id, "key": key, "request_hash": fingerprint, "status_code": 201,
              "response": {}, "created_at": utcnow()}  # fmt: skip
    with _user_must_exist(user_id):
        claim_id = session.execute(_claim_statement(session), values).scalar()
    if claim_id is not None:
        return int(claim_id)
    existing = session.execute(_READ_CLAIM, {"user_id": user_id, "key": key}).one_or_none()
    if existing is None:  # the record went between the two statements: only with its user
        raise NotFound(f"User {user_id!r} not found", "user_not_found")
    if existing.request_hash != fingerprint:
        raise Conflict(
            "Idempotency-Key was already used with a different request", "idempotency_key_reused"
        )
    return StoredResult(existing.status_code, existing.response, replayed=True)


def _claim_statement(session: Session) -> Any:
    """The claim in the session's dialect (Postgres, or SQLite for the embedded default)."""
    return _CLAIM_KEY[session.get_bind().dialect.name]


@contextmanager
def _user_must_exist(user_id: str) -> Iterator[None]:
    """The inserts' only possible integrity error is the foreign key to a user who is not there
    (unknown, or deleted by a concurrent request): a 404, as for any request about that user."""
    try:
        yield
    except IntegrityError as exc:
        raise NotFound(f"User {user_id!r} not found", "user_not_found") from exc


def pair_row(user_id: str, pair: Pair) -> PreferencePair:
    """The row that stores a checked pair (with its prompt's hash)."""
    return PreferencePair(**pair_values(user_id, pair))


def pair_values(user_id: str, pair: Pair) -> dict[str, Any]:
    """A checked pair's row as attribute values (for bulk inserts that keep no objects)."""
    return {
        "user_id": user_id,
        "messages": pair.messages,
        "prompt_hash": prompt_hash(pair.messages),
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "meta": pair.metadata,
    }


def _pair_columns(user_id: str, pair: Pair, created_at: datetime) -> dict[str, Any]:
    """A checked pair's row by column name (for the Core insert)."""
    values = pair_values(user_id, pair)
    return {**values, "metadata": values.pop("meta"), "created_at": created_at}


def _api_pair(pair_id: int, row: dict[str, Any]) -> dict[str, Any]:
    """The API form of a stored pair (JSON-ready), from its id and its row's columns."""
    return {
        "id": pair_id,
        "user_id": row["user_id"],
        "messages": row["messages"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "metadata": row["metadata"],
        "created_at": row["created_at"].isoformat(),
    }


def list_pairs(
    session: Session, user_id: str, limit: int, cursor: str | None
) -> RowPage[PreferencePair]:
    """A page of pairs, newest first; its cursor is the last pair's id."""
    query = select(PreferencePair).where(PreferencePair.user_id == user_id)
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 18:
            raise BadRequest(
                "cursor: not a cursor returned by this API", "invalid_cursor", param="cursor"
            )
        query = query.where(PreferencePair.id < int(cursor))
    query = query.order_by(PreferencePair.id.desc())
    return paginate(session, query, limit, cursor_of=lambda pair: str(pair.id))


def delete_pair(session: Session, user_id: str, pair_id: int) -> None:
    """Delete one of the user's pairs, or NotFound."""
    row = session.get(PreferencePair, pair_id)
    if row is None or row.user_id != user_id:
        raise NotFound(f"Pair {pair_id} not found", "pair_not_found")
    session.delete(row)
