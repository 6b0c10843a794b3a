"""API keys: a user may hold several; each is issued, listed (prefix only) and revoked by its id.

Only a key's SHA-256 is stored, looked up by equality on a unique index; the secret is shown once,
when issued. Revoking deletes the row, so the key stops authenticating with the next request. None
of this touches the user's pairs, jobs or adapters.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Select, Table, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from app.core.db import rows_matched
from app.core.errors import BadRequest, InvalidRequest, NotFound
from app.core.security import generate_api_key, hash_key
from app.models import ApiKey, User, utcnow
from app.services.pagination import RowPage, paginate

NAME_MAX_CHARS = 100
PREFIX_CHARS = 12  # "bapo_" and 7 random characters: enough to tell keys apart, useless to guess
# last_used_at is written at most this often per key: authentication stays a read.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class KeyOwner:
    """Who a presented key belongs to, and when it was last recorded as used."""

    key_id: int
    user_id: str
    last_used_at: datetime | None


def add_key(session: Session, user_id: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Store a new key for an existing user; returns (row, plain key). The plain key is not kept."""
    secret = generate_api_key()
    row = ApiKey(
        user_id=user_id,
        key_hash=hash_key(secret),
        prefix=secret[:PREFIX_CHARS],
        name=validate_name(name),
    )
    session.add(row)
    session.flush()
    return row, secret


def issue_key(session: Session, user_id: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the user (NotFound if unknown); returns (row, plain key)."""
    _require_user(session, user_id)
    return add_key(session, user_id, name)


def list_keys(session: Session, user_id: str, limit: int, cursor: str | None) -> RowPage[ApiKey]:
    """A page of the user's keys, newest first; its cursor is the last key's id."""
    _require_user(session, user_id)
    query = _keys_of(user_id)
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 10:
            raise BadRequest(
                "cursor: not a cursor returned by this API", "invalid_cursor", param="cursor"
            )
        query = query.where(ApiKey.id < int(cursor))
    return paginate(session, query, limit, cursor_of=lambda key: str(key.id))


def all_keys(session: Session, user_id: str) -> list[ApiKey]:
    """Every key of the user, newest first (NotFound if the user is unknown)."""
    _require_user(session, user_id)
    return list(session.scalars(_keys_of(user_id)))


def revoke_key(session: Session, user_id: str, key_id: int) -> int:
    """Delete one of the user's keys (NotFound if not theirs); returns how many keys they keep."""
    _require_user(session, user_id)
    row = session.get(ApiKey, key_id)
    if row is None or row.user_id != user_id:
        # Another user's key id is "not found" here too: the answer tells nothing about it.
        raise NotFound(f"API key {key_id} not found for user {user_id!r}", "api_key_not_found")
    session.delete(row)
    session.flush()
    left = session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.user_id == user_id))
    return int(left or 0)


# Every authenticated request runs this: built once, on the table (no ORM loading per row).
_KEYS = cast(Table, ApiKey.__table__)
_OWNER_OF = select(_KEYS.c.id, _KEYS.c.user_id, _KEYS.c.last_used_at).where(
    _KEYS.c.key_hash == bindparam("key_hash")
)


def owner_of(session: Session, secret: str) -> KeyOwner | None:
    """The key row a presented secret hashes to, or None (looked up by hash, never by secret)."""
    row = session.execute(_OWNER_OF, {"key_hash": hash_key(secret)}).one_or_none()
    return KeyOwner(row.id, row.user_id, row.last_used_at) if row is not None else None


def use_is_due(owner: KeyOwner, now: datetime) -> bool:
    """Whether this use should be written (never recorded, or last recorded a minute ago)."""
    return owner.last_used_at is None or now - owner.last_used_at >= LAST_USED_RESOLUTION


def record_use(session: Session, key_id: int, now: datetime | None = None) -> bool:
    """Set the key's last_used_at to now unless it is recent or the row is locked; True if set.

    The row is claimed with SKIP LOCKED (ignored by SQLite, which has no row locks), so a revoke
    or another replica's write in progress makes this a no-op instead of a wait.
    """
    now = now or utcnow()
    stale = or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_RESOLUTION)
    claimable = (
        select(ApiKey.id).where(and_(ApiKey.id == key_id, stale)).with_for_update(skip_locked=True)
    )
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id.in_(claimable.scalar_subquery()))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return rows_matched(result) == 1


def validate_name(name: str | None) -> str | None:
    """A key's label: surrounding spaces dropped, 1-100 printable characters, or None."""
    if name is None:
        return None
    name = name.strip()
    if not name or len(name) > NAME_MAX_CHARS:
        raise InvalidRequest(
            f"name must be 1-{NAME_MAX_CHARS} characters, or absent",
            "invalid_key_name",
            param="name",
        )
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise InvalidRequest(
            "name must not contain control characters", "invalid_key_name", param="name"
        )
    return name


def _keys_of(user_id: str) -> Select[ApiKey]:
    return select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id.desc())


def _require_user(session: Session, user_id: str) -> None:
    # users.get_user's check; not imported from there because users.create_user uses add_key.
    if session.get(User, user_id) is None:
        raise NotFound(f"User {user_id!r} not found", "user_not_found")
