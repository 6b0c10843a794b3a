"""The app's state: one typed object that create_app builds and every request shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette

from app.core.config import Settings
from app.core.metrics import Metrics
from app.core.ratelimit import RateLimiter
from app.inference import InferenceBackend
from app.services.generate import GenerateHandler
from app.services.health import Check

STATE_ATTRIBUTE = "bapo"  # the one name under Starlette's `app.state`
UserDeletedHook = Callable[[Session, str], None]
ShutdownHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class AppState:
    """What the process builds once: settings, database, keys, metrics, limits, generation."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    operator_key: str
    metrics: Metrics
    rate_limiter: RateLimiter
    generate: GenerateHandler
    ready_checks: dict[str, Check]
    user_deleted_hooks: list[UserDeletedHook]
    shutdown_hooks: list[ShutdownHook]

    @property
    def inference(self) -> InferenceBackend:
        """The inference backend behind the generate handler."""
        return self.generate.backend


def install_state(app: Starlette, state: AppState) -> None:
    """Store the state on the app (once, by create_app)."""
    setattr(app.state, STATE_ATTRIBUTE, state)


def app_state(app: Starlette) -> AppState:
    """The app's state."""
    state = getattr(app.state, STATE_ATTRIBUTE)
    if not isinstance(state, AppState):
        raise TypeError(f"app.state.{STATE_ATTRIBUTE} is not an AppState")
    return state


async def get_state(request: Request) -> AppState:
    """Dependency: the state of the app serving this request."""
    return app_state(request.app)


StateDep = Annotated[AppState, Depends(get_state)]
