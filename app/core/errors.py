"""Typed errors that carry their HTTP status, and the handlers that render the one error shape.

Every 4xx/5xx body is `{"error": {"type": ..., "message": ..., "code": ..., "param": ...}}`
(OpenAI's shape; `param` is null when no one field is to blame).

Under `/v1/` (the OpenAI-compatible surface) errors speak OpenAI's dialect, because its clients
and routers branch on it: invalid input is 400 (not 422), and a too-long prompt is
`context_length_exceeded`. Everywhere, a 409 carries `x-should-retry: false`: our conflicts do not
clear by themselves, and OpenAI's SDK would otherwise retry every 409.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class AppError(Exception):
    """Base of every expected error; subclasses fix the status and type."""

    status_code = 500
    type = "internal_error"
    default_code = "internal_error"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.headers = headers
        self.param = param
        self.details = details  # more fields of the error object, e.g. the bad lines of a file


class InvalidRequest(AppError):
    status_code = 422
    type = "invalid_request_error"
    default_code = "invalid_request"


class BadRequest(InvalidRequest):
    status_code = 400


class Unauthorized(AppError):
    status_code = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(AppError):
    status_code = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(AppError):
    status_code = 404
    type = "not_found_error"
    default_code = "not_found"


class Conflict(AppError):
    status_code = 409
    type = "conflict_error"
    default_code = "conflict"


class PayloadTooLarge(AppError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaType(AppError):
    status_code = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(AppError):
    status_code = 429
    type = "rate_limit_error"
    default_code = "rate_limited"


class ServiceUnavailable(AppError):
    status_code = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


OPENAI_PREFIX = "/v1/"
OPENAI_CODES = {"prompt_too_long": "context_length_exceeded"}  # ours → OpenAI's name
NO_RETRY = {"x-should-retry": "false"}  # honoured by OpenAI's SDKs


def error_body(
    type_: str,
    message: str,
    code: str,
    param: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one error shape (`details` adds fields beside type, message, code and param)."""
    error: dict[str, Any] = {"type": type_, "message": message, "code": code, "param": param}
    error.update(details or {})
    return {"error": error}


def render_error(
    request: Request | None,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error response, in OpenAI's dialect under /v1/; 409s say not to retry."""
    if request is not None and request.url.path.startswith(OPENAI_PREFIX):
        if status == 422:
            status = 400
        error = body["error"]
        error["code"] = OPENAI_CODES.get(error["code"], error["code"])
    if status == 409:
        headers = {**NO_RETRY, **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: AppError, request: Request | None = None) -> JSONResponse:
    """Render an AppError."""
    body = error_body(exc.type, exc.message, exc.code, exc.param, exc.details)
    return render_error(request, exc.status_code, body, exc.headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    # Drop the location and the union tags of the feedback body ("pair", "openai", "batch").
    skip = {"body", "query", "path", "header", "pair", "openai", "batch"}
    parts = [str(p) for p in loc if p not in skip]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str, str, int]:
    """(message, code, param, status) for a FastAPI validation error, naming the bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return "Request body is not valid JSON", "invalid_json", "body", 400
    param = _field_path(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param}: {msg}{more}", "validation_error", param, 422


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, expected or not, in the one shape."""

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, code, param, status = validation_message(exc)
        body = error_body("invalid_request_error", message, code, param)
        return render_error(request, status, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "http_error"
        )
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        body = error_body(kind, str(exc.detail), code)
        return render_error(request, exc.status_code, body, getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return error_response(
            ServiceUnavailable(
                "Database unavailable, retry shortly",
                "database_unavailable",
                headers={"Retry-After": "2"},
            )
        )

    @app.exception_handler(DBAPIError)
    async def _db_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(
                ServiceUnavailable(
                    "Database connection lost, retry shortly",
                    "database_unavailable",
                    headers={"Retry-After": "2"},
                )
            )
        log.exception("database error")
        return JSONResponse(
            error_body("internal_error", "Internal database error", "internal_error"), 500
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "Internal server error", "internal_error"), 500
        )
