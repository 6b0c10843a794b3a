"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api.routes import (
    adapters,
    feedback,
    files,
    fine_tuning,
    generate,
    health,
    keys,
    metrics,
    openai_compat,
    train,
    users,
    web,
)
from app.api.state import AppState, app_state, install_state
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_sessionmaker, migration_state, upgrade_to_head
from app.core.errors import install_error_handlers
from app.core.metrics import Metrics, MetricsMiddleware
from app.core.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from app.core.ratelimit import RateLimiter, limiter_redis_url
from app.core.security import load_or_create_operator_key
from app.queue import broker_check
from app.services.generate import build_handler
from app.services.health import database_check

log = logging.getLogger(__name__)
API_VERSION = "0.1.0"


class NotMigratedError(RuntimeError):
    """The database schema is not at the code's migration head."""


def prepare_database(settings: Settings, app: FastAPI) -> None:
    """Migrate an embedded database; refuse to serve an un-migrated server database."""
    engine = app_state(app).engine
    if settings.auto_migrate:
        upgrade_to_head(settings.database_url)
    current, head = migration_state(engine)
    if current != head:
        raise NotMigratedError(
            f"Database is at migration {current or 'none'} but this code needs {head}. "
            "Run `alembic upgrade head` (or the compose `migrate` service) first, "
            "or set AUTO_MIGRATE=true."
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for these settings (the process settings by default)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app_state(app)
        prepare_database(settings, app)
        state.generate.start()
        yield
        for hook in state.shutdown_hooks:
            await hook()
        state.engine.dispose()

    app = FastAPI(
        title="BAPO personalization service",
        version=API_VERSION,
        summary="Per-user LoRA adapters trained with BAPO on preference feedback, served by vLLM.",
        lifespan=lifespan,
    )
    install_state(app, build_state(settings))
    install_error_handlers(app)
    for router in (health.router, metrics.router, users.router, feedback.router, train.router):
        app.include_router(router)
    for router in (keys.router, adapters.router, generate.router, openai_compat.router):
        app.include_router(router)
    for router in (files.router, fine_tuning.router):  # the rest of /v1
        app.include_router(router)
    app.include_router(web.router)  # the playground page at /
    _add_openapi_schemas(app, feedback.OPENAPI_SCHEMAS)
    _add_middleware(app, settings)
    return app


def _add_openapi_schemas(app: FastAPI, schemas: dict[str, Any]) -> None:
    """Put models that a route documents by hand (a body it validates itself) into the OpenAPI
    document's components; a model FastAPI already lists there is kept as FastAPI wrote it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()  # FastAPI keeps it in app.openapi_schema: this runs once
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in schemas.items():
            components.setdefault(name, schema)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def build_state(settings: Settings) -> AppState:
    """Everything the requests share: database, keys, metrics, limits, the generate handler."""
    engine = make_engine(settings)
    metrics = Metrics()
    metrics.watch_jobs(engine)
    handler = build_handler(settings, metrics)
    checks = {"database": database_check(engine), "broker": broker_check(settings)}
    return AppState(
        settings=settings,
        engine=engine,
        session_factory=make_sessionmaker(engine),
        operator_key=_operator_key(settings),
        metrics=metrics,
        rate_limiter=RateLimiter(limiter_redis_url(settings)),
        generate=handler,
        ready_checks={**checks, "inference": handler.backend.ready},
        user_deleted_hooks=[handler.user_deleted],
        shutdown_hooks=[handler.backend.aclose],
    )


def _operator_key(settings: Settings) -> str:
    """OPERATOR_KEY, else the key generated once and kept in DATA_DIR."""
    if settings.operator_key is not None:
        return settings.operator_key.get_secret_value()
    key, _ = load_or_create_operator_key(settings.data_dir)
    return key


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        upload_max_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=app_state(app).metrics)
    app.add_middleware(RequestIdMiddleware)
