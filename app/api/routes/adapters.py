"""A user's adapter versions: list, activate one (roll back or forward, pinning it), unpin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.deps import SessionDep, SettingsDep, UserIdDep
from app.api.routes.generate import HandlerDep
from app.core.config import Settings
from app.schemas.adapters import AdapterList
from app.schemas.common import ERROR_RESPONSES
from app.services import adapters as adapter_service

router = APIRouter(prefix="/users/{user_id}/adapters", tags=["adapters"], responses=ERROR_RESPONSES)


@router.get("", response_model=AdapterList, summary="List adapter versions")
def list_adapters(user_id: UserIdDep, session: SessionDep, settings: SettingsDep) -> AdapterList:
    """Every version with its metrics and gate result, newest first, and which one is active."""
    return _listing(session, settings, user_id)


@router.post("/{version}/activate", response_model=AdapterList, summary="Activate a version")
def activate_adapter(
    user_id: UserIdDep,
    session: SessionDep,
    settings: SettingsDep,
    handler: HandlerDep,
    version: Annotated[str, Path(max_length=12, description="`v3`, `3`, or `base` (no adapter).")],
) -> AdapterList:
    """Serve this version by default from the next request on (404 unknown, 409 files missing).

    Pins the choice, unless it is the newest version: new versions are then not activated.
    """
    handler.activate(session, user_id, version)
    return _listing(session, settings, user_id)


@router.post("/unpin", response_model=AdapterList, summary="Follow new versions again")
def unpin_adapter(user_id: UserIdDep, session: SessionDep, settings: SettingsDep) -> AdapterList:
    """Clear the pin: the active version stays until a new version passes the gate."""
    adapter_service.unpin(session, user_id)
    return _listing(session, settings, user_id)


def _listing(session: SessionDep, settings: Settings, user_id: str) -> AdapterList:
    """The versions, the active one and whether it is pinned."""
    listing = adapter_service.listing(session, user_id, settings.adapter_store)
    return AdapterList.model_validate(listing)
