"""Adapter version numbers: each issued once per user id, never again.

Issuing a version raises the user id's version floor, which no deletion lowers (not a GC, not the
user's deletion), and the next version is always above it: a serving name `user-<id>-v<N>` an
inference server may still hold never comes back for other weights.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Adapter, AdapterVersionFloor


def next_version(session: Session, user_id: str) -> int:
    """The user's next version number: above every version ever issued for this user id.

    Locks the user id's floor row (Postgres), so concurrent publishers wait for each other.
    """
    floor = session.get(AdapterVersionFloor, user_id, with_for_update=True)
    # Rows kept from before every issue raised the floor (migration 0004 backfills those too).
    latest = newest_version(session, user_id)
    return max(latest or 0, floor.last_version if floor else 0) + 1


def newest_version(session: Session, user_id: str) -> int | None:
    """The user's highest recorded version, None without any."""
    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.user_id == user_id))
    return int(latest) if latest is not None else None


def raise_floor(session: Session, user_id: str, version: int) -> None:
    """Record `version` as issued: no later version of this user id is numbered at or below it."""
    floor = session.get(AdapterVersionFloor, user_id)
    if floor is None:
        session.add(AdapterVersionFloor(user_id=user_id, last_version=version))
    else:
        floor.last_version = max(floor.last_version, version)
