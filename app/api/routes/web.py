"""The web playground: static page and assets (with a strict CSP), and `GET /whoami`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from app.api.deps import PrincipalDep
from app.core.errors import NotFound
from app.schemas.common import ERROR_RESPONSES

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# No inline script or style, nothing from elsewhere: text on the page (model output too) never runs.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    # Assets change with the code; revalidate instead of serving a stale page after an upgrade.
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["web"])


class WhoAmI(BaseModel):
    operator: bool = Field(description="True for the operator key.")
    user_id: str | None = Field(description="The user a user key belongs to; null for operator.")


def _assets() -> dict[str, Path]:
    """Servable files by name: a fixed list read once, so no request path reaches the disk."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


ASSETS = _assets()


def _file(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"No such file: {name}", "route_not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The playground page."""
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    """A script, stylesheet or image of the playground."""
    return _file(name)


@router.get(
    "/whoami", response_model=WhoAmI, summary="Who this API key is", responses=ERROR_RESPONSES
)
def whoami(principal: PrincipalDep) -> WhoAmI:
    """The operator, or the user id a user key belongs to (the playground signs in with it)."""
    return WhoAmI(operator=principal.is_operator, user_id=principal.user_id)
