"""Users: create (operator), read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response

from app.api.deps import LimitDep, OperatorDep, SessionDep, UserIdDep
from app.api.state import StateDep
from app.schemas.common import ERROR_RESPONSES, Page
from app.schemas.users import UserCreate, UserCreated, UserOut
from app.services import users as user_service

router = APIRouter(prefix="/users", tags=["users"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=UserCreated, summary="Create a user (operator)")
def create_user(
    _operator: OperatorDep, session: SessionDep, body: Annotated[UserCreate | None, Body()] = None
) -> UserCreated:
    """Create a user and return its API key (shown once)."""
    user, key = user_service.create_user(session, body.id if body else None)
    return UserCreated(id=user.id, api_key=key, created_at=user.created_at)


@router.get("", response_model=Page[UserOut], summary="List users (operator)")
def list_users(
    _operator: OperatorDep,
    session: SessionDep,
    limit: LimitDep,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[UserOut]:
    """Users ordered by id; `cursor` is the last id of the previous page."""
    return Page[UserOut].model_validate(user_service.list_users(session, limit, cursor))


@router.get("/{user_id}", response_model=UserOut, summary="Get a user")
def get_user(user_id: UserIdDep, session: SessionDep) -> UserOut:
    """The user, their pair count and active adapter version."""
    user = user_service.get_user(session, user_id)
    return UserOut.model_validate(user_service.summarize(session, user))


@router.delete("/{user_id}", status_code=204, summary="Delete a user and everything of theirs")
def delete_user(user_id: UserIdDep, session: SessionDep, state: StateDep) -> Response:
    """Erase the user's keys, pairs, jobs and adapters (files included)."""
    user_service.delete_user(session, user_id, state.settings.adapter_store)
    for hook in state.user_deleted_hooks:
        hook(session, user_id)
    return Response(status_code=204)
