"""Users and their API keys."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.core.errors import Conflict, NotFound
from app.core.security import Principal, validate_user_id
from app.models import (
    Adapter,
    ApiKey,
    IdempotencyRecord,
    JobEvent,
    PreferencePair,
    TrainingJob,
    User,
)
from app.services import adapter_versions, api_keys
from app.services.pagination import RowPage, paginate
from foundation.adapter_store import AdapterStore


@dataclass(frozen=True)
class UserSummary:
    id: str
    created_at: datetime
    pair_count: int
    active_adapter_version: int | None


def create_user(session: Session, user_id: str | None) -> tuple[User, str]:
    """Create a user (id given or generated) and its first API key; returns (user, plain key)."""
    user_id = validate_user_id(user_id) if user_id is not None else "u_" + secrets.token_hex(8)
    if session.get(User, user_id) is not None:
        raise Conflict(f"User {user_id!r} already exists", "user_exists")
    user = User(id=user_id)
    try:
        with session.begin_nested():
            session.add(user)
            session.flush()
    except IntegrityError as exc:  # a concurrent request created the same id
        raise Conflict(f"User {user_id!r} already exists", "user_exists") from exc
    _, key = api_keys.add_key(session, user_id)
    return user, key


def get_user(session: Session, user_id: str) -> User:
    """The user, or NotFound."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"User {user_id!r} not found", "user_not_found")
    return user


def require_user(session: Session, user_id: str, principal: Principal) -> None:
    """NotFound unless the user exists. The user's own key needs no query: the key row just read
    references the user and is deleted with them (a delete racing this request fails its inserts
    on the foreign key, which the feedback service reports as the same 404)."""
    if principal.user_id != user_id:
        get_user(session, user_id)


def summarize(session: Session, user: User) -> UserSummary:
    """The user with their pair count."""
    count = session.scalar(
        select(func.count()).select_from(PreferencePair).where(PreferencePair.user_id == user.id)
    )
    return UserSummary(user.id, user.created_at, int(count or 0), user.active_adapter_version)


def list_users(session: Session, limit: int, after: str | None) -> RowPage[UserSummary]:
    """A page of users ordered by id, after the id `after`, each with their pair count."""
    query = select(User).order_by(User.id)
    if after is not None:
        query = query.where(User.id > after)
    page: RowPage[User] = paginate(session, query, limit, cursor_of=lambda user: user.id)
    return page.map(lambda user: summarize(session, user))


def delete_user(session: Session, user_id: str, store: AdapterStore) -> None:
    """Erase the user: pairs, keys, jobs, events, adapters, and (after commit) adapter files."""
    get_user(session, user_id)
    _keep_version_floor(session, user_id)
    job_ids = select(TrainingJob.id).where(TrainingJob.user_id == user_id)
    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
    names = list(session.scalars(select(Adapter.name).where(Adapter.user_id == user_id)))
    for model in (TrainingJob, Adapter, PreferencePair, IdempotencyRecord, ApiKey):
        session.execute(delete(model).where(model.user_id == user_id))
    session.execute(delete(User).where(User.id == user_id))
    after_commit(session, lambda: store.remove_user(user_id, names))


def _keep_version_floor(session: Session, user_id: str) -> None:
    """Remember the user's last adapter version so a re-created user never reuses its names."""
    latest = adapter_versions.newest_version(session, user_id)
    if latest is not None:
        adapter_versions.raise_floor(session, user_id, latest)
