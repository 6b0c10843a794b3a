"""Preference pairs: validation, idempotent storage, paging, deletion."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import BadRequest, Conflict, InvalidRequest, NotFound
from app.models import IdempotencyRecord, PreferencePair
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


def store_pairs(
    session: Session, user_id: str, pairs: list[Pair], idempotency_key: str | None
) -> StoredResult:
    """Store pairs once per idempotency key; a retry with the same key replays the first result."""
    record = None
    if idempotency_key is not None:
        replay = _claim_key(session, user_id, idempotency_key, request_fingerprint(pairs))
        if isinstance(replay, StoredResult):
            return replay
        record = replay
    rows = [pair_row(user_id, p) for p in pairs]
    session.add_all(rows)
    session.flush()
    body = {"object": "list", "created": len(rows), "pairs": [pair_dict(r) for r in rows]}
    if record is not None:
        record.response = body
        session.flush()
    return StoredResult(201, body, replayed=False)


def _claim_key(
    session: Session, user_id: str, key: str, fingerprint: str
) -> StoredResult | IdempotencyRecord:
    """Either the earlier result for this key, or a fresh record that reserves the key."""
    if not key or len(key) > 255:
        raise BadRequest(
            "Idempotency-Key: 1 to 255 characters",
            "invalid_idempotency_key",
            param="Idempotency-Key",
        )
    existing = _find_record(session, user_id, key)
    if existing is None:
        record = IdempotencyRecord(
            user_id=user_id, key=key, request_hash=fingerprint, status_code=201, response={}
        )
        try:
            with session.begin_nested():
                session.add(record)
                session.flush()
            return record
        except IntegrityError:  # a concurrent request holds this key; it has committed now
            existing = _find_record(session, user_id, key)
            assert existing is not None
    if existing.request_hash != fingerprint:
        raise Conflict(
            "Idempotency-Key was already used with a different request", "idempotency_key_reused"
        )
    return StoredResult(existing.status_code, existing.response, replayed=True)


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


def _find_record(session: Session, user_id: str, key: str) -> IdempotencyRecord | None:
    return session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key
        )
    )


def pair_dict(row: PreferencePair) -> dict[str, Any]:
    """The API form of a stored pair (JSON-ready)."""
    return {
        "id": row.id,
        "user_id": row.user_id,
        "messages": row.messages,
        "chosen": row.chosen,
        "rejected": row.rejected,
        "metadata": row.meta,
        "created_at": row.created_at.isoformat(),
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
