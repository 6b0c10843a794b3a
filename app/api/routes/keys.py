"""A user's API keys: issue (the secret shown once), list (prefixes only), revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response

from app.api.deps import LimitDep, SessionDep, UserIdDep
from app.schemas.common import ERROR_RESPONSES, Page
from app.schemas.keys import KeyCreate, KeyCreated, KeyOut
from app.services import api_keys as api_key_service

router = APIRouter(prefix="/users/{user_id}/keys", tags=["keys"], responses=ERROR_RESPONSES)
KEY_ID_MAX = 2**31 - 1  # api_keys.id is a 32-bit integer


@router.post("", status_code=201, response_model=KeyCreated, summary="Issue an API key")
def issue_key(
    user_id: UserIdDep, session: SessionDep, body: Annotated[KeyCreate | None, Body()] = None
) -> KeyCreated:
    """A new key for the user, with an optional name; the secret is in this answer only."""
    row, secret = api_key_service.issue_key(session, user_id, body.name if body else None)
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), api_key=secret)


@router.get("", response_model=Page[KeyOut], summary="List API keys")
def list_keys(
    user_id: UserIdDep,
    session: SessionDep,
    limit: LimitDep,
    cursor: Annotated[str | None, Query(max_length=32, description="From `next_cursor`.")] = None,
) -> Page[KeyOut]:
    """The user's keys, newest first: prefix, name and dates, never the secret or its hash."""
    return Page[KeyOut].model_validate(api_key_service.list_keys(session, user_id, limit, cursor))


@router.delete("/{key_id}", status_code=204, summary="Revoke an API key")
def revoke_key(
    user_id: UserIdDep, session: SessionDep, key_id: Annotated[int, Path(ge=1, le=KEY_ID_MAX)]
) -> Response:
    """Delete the key: it stops authenticating at once. The user's data is untouched."""
    api_key_service.revoke_key(session, user_id, key_id)
    return Response(status_code=204)
