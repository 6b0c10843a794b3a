"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.state import StateDep
from app.services import health

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    """Always ok while the process serves requests."""
    return {"status": "ok"}


@router.get(
    "/readyz", summary="Dependencies are reachable", responses={503: {"description": "Not ready"}}
)
async def readyz(state: StateDep) -> Any:
    """200 when every dependency answers (database, broker, inference), else 503."""
    checks = await health.run_checks(state.ready_checks)
    ready = all(c["ok"] for c in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
