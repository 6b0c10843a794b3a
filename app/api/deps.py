"""Request dependencies: the app's state and settings, the per-request transaction, who is calling,
page sizes and rate limits."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from anyio import CancelScope, CapacityLimiter, to_thread
from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.api.state import AppState, StateDep, app_state
from app.core.config import Settings
from app.core.db import end_transaction, has_pending_work, transaction
from app.core.errors import Unauthorized
from app.core.ratelimit import enforce
from app.core.security import Principal, keys_equal, validate_user_id
from app.models import utcnow
from app.services import api_keys as api_key_service

log = logging.getLogger(__name__)
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <api key>`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


# Dependencies that do no I/O are `async`: a sync one costs a hop to the thread pool per request.


async def get_settings(state: StateDep) -> Settings:
    """The app's settings."""
    return state.settings


async def get_session(state: StateDep) -> AsyncIterator[Session]:
    """One transaction per request, committed before the response is sent.

    The session connects on first use, so opening it needs no thread; its commit (or rollback)
    runs in a worker thread only when the request used the database. As FastAPI does for a sync
    dependency's exit, that thread is outside the pool's capacity limit (a request holding a
    connection never waits for a thread to release it) and shielded from cancellation.
    """
    session = state.session_factory()
    failed = True
    try:
        yield session
        failed = False
    finally:
        if has_pending_work(session):
            with CancelScope(shield=True):
                await to_thread.run_sync(
                    end_transaction, session, failed, limiter=CapacityLimiter(1)
                )
        else:
            end_transaction(session, failed)  # nothing began: closing needs no I/O


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the commit happens before the response goes out, so a 2xx means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_principal(
    state: StateDep,
    session: SessionDep,
    credentials: BearerDep,
) -> Principal:
    """Resolve the API key to the operator or a user; 401 if missing or unknown. (Also a plain
    function: POST feedback calls it in its own worker thread.)"""
    if credentials is None:
        if state.settings.allow_anonymous_local:
            return Principal(is_operator=True)
        raise Unauthorized(
            "Missing API key: send `Authorization: Bearer <key>`",
            "missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = credentials.credentials
    if keys_equal(key, state.operator_key):
        return Principal(is_operator=True)
    owner = api_key_service.owner_of(session, key)
    if owner is None:
        raise Unauthorized(
            "Invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
    _record_key_use(state, owner)
    return Principal(is_operator=False, user_id=owner.user_id)


def _record_key_use(state: AppState, owner: api_key_service.KeyOwner) -> None:
    """Note the key's use at most once a minute, in its own short transaction (so the request's
    transaction holds no lock on the key row); a failure to write it never fails the request."""
    now = utcnow()
    if not api_key_service.use_is_due(owner, now):
        return
    try:
        with transaction(state.session_factory) as session:
            api_key_service.record_use(session, owner.key_id, now)
    except SQLAlchemyError:
        log.warning("could not record the use of API key %s", owner.key_id, exc_info=True)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_operator(principal: PrincipalDep) -> Principal:
    """Only the operator key passes."""
    principal.require_operator()
    return principal


OperatorDep = Annotated[Principal, Depends(require_operator)]


def metrics_access(
    state: StateDep,
    session: SessionDep,
    credentials: BearerDep,
) -> None:
    """Only the operator key, when METRICS_REQUIRE_OPERATOR_KEY is on (else 401/403)."""
    if state.settings.metrics_require_operator_key:
        get_principal(state, session, credentials).require_operator()


MetricsAccessDep = Depends(metrics_access)


def is_operator_request(request: Request) -> bool:
    """Whether the request carries the operator key (or no key, where local use allows that)."""
    scheme, key = get_authorization_scheme_param(request.headers.get("authorization"))
    state = app_state(request.app)
    if not key:
        return bool(state.settings.allow_anonymous_local)
    return scheme.lower() == "bearer" and keys_equal(key, state.operator_key)


async def authorized_user_id(
    principal: PrincipalDep,
    user_id: Annotated[str, Path(description="User id ([A-Za-z0-9_.-]{1,64}).", max_length=64)],
) -> str:
    """The path's user id, checked for shape and for the caller's right to act on it."""
    validate_user_id(user_id)
    principal.authorize_user(user_id)
    return user_id


UserIdDep = Annotated[str, Depends(authorized_user_id)]


async def page_limit(
    settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="Page size.")] = None,
) -> int:
    """The page size asked for, within the configured bounds."""
    return min(limit or settings.page_size_default, settings.page_size_max)


LimitDep = Annotated[int, Depends(page_limit)]


def rate_limit(group: str) -> Callable[[AppState, Principal], None]:
    """A dependency limiting users on the `group` routes ("generate" or "train")."""

    def check(state: StateDep, principal: PrincipalDep) -> None:
        if principal.is_operator or principal.user_id is None:
            return  # the operator key is the deployment's own trusted caller
        enforce(state.rate_limiter, state.settings, group, principal.user_id)

    return check
