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


@dataclass(frozen=True)
class NormalizedPair:
    """A pair in the one stored form: chat messages, chosen, rejected, metadata."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class StoredResult:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """SHA-256 of the canonical JSON of the prompt's messages."""
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def normalize(
    body: PairIn | OpenAIPreferenceIn | PairBatchIn, settings: Settings
) -> list[NormalizedPair]:
    """Turn any accepted feedback shape into validated pairs, or raise a 4xx naming the field."""
    items = body.pairs if isinstance(body, PairBatchIn) else [body]
    if len(items) > settings.max_batch_pairs:
        raise InvalidRequest(
            f"pairs: at most {settings.max_batch_pairs} pairs per request",
            "batch_too_large",
            param="pairs",
        )
    prefix = "pairs." if isinstance(body, PairBatchIn) else ""
    return [
        _normalize_one(item, f"{prefix}{i}." if prefix else "", settings)
        for i, item in enumerate(items)
    ]


def _normalize_one(
    item: PairIn | OpenAIPreferenceIn, where: str, settings: Settings
) -> NormalizedPair:
    if isinstance(item, OpenAIPreferenceIn):
        messages = [m.model_dump() for m in item.input.messages]
        chosen, rejected = item.preferred_output[0], item.non_preferred_output[0]
        for name, msg in (("preferred_output", chosen), ("non_preferred_output", rejected)):
            if msg.role != "assistant":
                raise InvalidRequest(
                    f"{where}{name}.0.role: must be 'assistant'",
                    "invalid_role",
                    param=f"{where}{name}",
                )
        pair = NormalizedPair(messages, chosen.content, rejected.content, item.metadata)
        names = (
            f"{where}input.messages",
            f"{where}preferred_output",
            f"{where}non_preferred_output",
        )
    else:
        messages = (
            [{"role": "user", "content": item.prompt}]
            if item.prompt is not None
            else [m.model_dump() for m in item.messages or []]
        )
        pair = NormalizedPair(messages, item.chosen, item.rejected, item.metadata)
        prompt_name = "prompt" if item.prompt is not None else "messages"
        names = (f"{where}{prompt_name}", f"{where}chosen", f"{where}rejected")
    _check_pair(pair, names, settings)
    return pair


def _check_pair(pair: NormalizedPair, names: tuple[str, str, str], settings: Settings) -> None:
    prompt_name, chosen_name, rejected_name = names
    _check_messages(pair.messages, prompt_name, settings)
    _check_text(pair.chosen, chosen_name, settings)
    _check_text(pair.rejected, rejected_name, settings)
    if pair.chosen.strip() == pair.rejected.strip():
        raise InvalidRequest(
            f"{chosen_name}: chosen and rejected are identical",
            "identical_responses",
            param=chosen_name,
        )
    if pair.metadata is not None:
        size = len(json.dumps(pair.metadata, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if size > settings.max_metadata_bytes:
            raise InvalidRequest(
                f"metadata: larger than {settings.max_metadata_bytes} bytes",
                "metadata_too_large",
                param="metadata",
            )


def _check_messages(messages: list[dict[str, str]], name: str, settings: Settings) -> None:
    if not messages:
        raise InvalidRequest(
            f"{name}: at least one message is needed", "empty_messages", param=name
        )
    if len(messages) > settings.max_messages:
        raise InvalidRequest(
            f"{name}: at most {settings.max_messages} messages", "too_many_messages", param=name
        )
    if messages[-1]["role"] != "user":
        raise InvalidRequest(
            f"{name}: the last message must be a user turn", "last_turn_not_user", param=name
        )
    for i, message in enumerate(messages):
        field = name if name.endswith("prompt") else f"{name}.{i}.content"
        _check_text(message["content"], field, settings)


def _check_text(text: str, name: str, settings: Settings) -> None:
    if not text.strip():
        raise InvalidRequest(f"{name}: must not be empty", "empty_text", param=name)
    if len(text) > settings.max_text_chars:
        raise InvalidRequest(
            f"{name}: longer than {settings.max_text_chars} characters", "text_too_long", param=name
        )
    if "\x00" in text:
        raise InvalidRequest(f"{name}: must not contain NUL characters", "invalid_text", param=name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \ud800-style JSON escapes
        raise InvalidRequest(f"{name}: not valid Unicode text", "invalid_text", param=name) from exc


def request_fingerprint(pairs: list[NormalizedPair]) -> str:
    """Hash of the normalized request, to tell a true retry from a reused key."""
    raw = json.dumps([p.__dict__ for p in pairs], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def store_pairs(
    session: Session, user_id: str, pairs: list[NormalizedPair], idempotency_key: str | None
) -> StoredResult:
    """Store pairs once per idempotency key; a retry with the same key replays the first result."""
    record = None
    if idempotency_key is not None:
        replay = _claim_key(session, user_id, idempotency_key, request_fingerprint(pairs))
        if isinstance(replay, StoredResult):
            return replay
        record = replay
    rows = [
        PreferencePair(
            user_id=user_id,
            messages=p.messages,
            prompt_hash=prompt_hash(p.messages),
            chosen=p.chosen,
            rejected=p.rejected,
            meta=p.metadata,
        )
        for p in pairs
    ]
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
) -> tuple[list[PreferencePair], str | None]:
    """A page of pairs, newest first, and the cursor of the next page (None at the end)."""
    query = select(PreferencePair).where(PreferencePair.user_id == user_id)
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 18:
            raise BadRequest(
                "cursor: not a cursor returned by this API", "invalid_cursor", param="cursor"
            )
        query = query.where(PreferencePair.id < int(cursor))
    rows = list(session.scalars(query.order_by(PreferencePair.id.desc()).limit(limit + 1)))
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def delete_pair(session: Session, user_id: str, pair_id: int) -> None:
    """Delete one of the user's pairs, or NotFound."""
    row = session.get(PreferencePair, pair_id)
    if row is None or row.user_id != user_id:
        raise NotFound(f"Pair {pair_id} not found", "pair_not_found")
    session.delete(row)
