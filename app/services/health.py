"""Readiness checks. Each check is a named async callable returning (ok, detail)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from app.core.db import migration_state

Check = Callable[[], Awaitable[tuple[bool, str]]]
CHECK_TIMEOUT_S = 3.0


def database_check(engine: Engine) -> Check:
    """Ready when the database answers and is migrated to the code's head revision."""

    def probe() -> tuple[bool, str]:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            current, head = migration_state(engine)
        except SQLAlchemyError as exc:
            return False, f"unreachable: {type(exc).__name__}"
        if current != head:
            return False, f"not migrated (at {current}, code needs {head})"
        return True, "ok"

    async def check() -> tuple[bool, str]:
        return await asyncio.to_thread(probe)

    return check


async def run_checks(checks: dict[str, Check]) -> dict[str, dict[str, Any]]:
    """Run every check concurrently, each bounded by a timeout."""
    results = await asyncio.gather(*(_bounded(c) for c in checks.values()))
    return {
        name: {"ok": ok, "detail": detail}
        for name, (ok, detail) in zip(checks, results, strict=True)
    }


async def _bounded(check: Check) -> tuple[bool, str]:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return False, f"timed out after {CHECK_TIMEOUT_S}s"
