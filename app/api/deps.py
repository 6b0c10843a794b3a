"""Request dependencies: settings, the per-request transaction, and who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import transaction
from app.core.errors import Unauthorized
from app.core.security import Principal, keys_equal, validate_user_id
from app.services import users as user_service

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <api key>`")


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request, committed before the response is sent."""
    with transaction(request.app.state.sessionmaker) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the commit happens before the response goes out, so a 2xx means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """Resolve the API key to the operator or a user; 401 if missing or unknown."""
    if credentials is None:
        if request.app.state.settings.allow_anonymous_local:
            return Principal(is_operator=True)
        raise Unauthorized(
            "Missing API key: send `Authorization: Bearer <key>`",
            "missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = credentials.credentials
    if keys_equal(key, request.app.state.operator_key):
        return Principal(is_operator=True)
    user_id = user_service.user_for_key(session, key)
    if user_id is None:
        raise Unauthorized(
            "Invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
    return Principal(is_operator=False, user_id=user_id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_operator(principal: PrincipalDep) -> Principal:
    """Only the operator key passes."""
    principal.require_operator()
    return principal


OperatorDep = Annotated[Principal, Depends(require_operator)]


def metrics_access(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Only the operator key, when METRICS_REQUIRE_OPERATOR_KEY is on (else 401/403)."""
    if request.app.state.settings.metrics_require_operator_key:
        get_principal(request, session, credentials).require_operator()


MetricsAccessDep = Depends(metrics_access)


def authorized_user_id(
    principal: PrincipalDep,
    user_id: Annotated[str, Path(description="User id ([A-Za-z0-9_.-]{1,64}).", max_length=64)],
) -> str:
    """The path's user id, checked for shape and for the caller's right to act on it."""
    validate_user_id(user_id)
    principal.authorize_user(user_id)
    return user_id


UserIdDep = Annotated[str, Depends(authorized_user_id)]


def page_limit(
    request: Request,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="Page size.")] = None,
) -> int:
    """The page size asked for, within the configured bounds."""
    settings: Settings = request.app.state.settings
    return min(limit or settings.page_size_default, settings.page_size_max)


LimitDep = Annotated[int, Depends(page_limit)]
