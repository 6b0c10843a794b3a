"""Shapes shared by several routes."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class StrictModel(BaseModel):
    """Request bodies refuse unknown fields instead of silently dropping them."""

    model_config = ConfigDict(extra="forbid")


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(description="The turn's text; not empty.")


class ResponseModel(BaseModel):
    """A response shape read from the attributes of a row: `Schema.model_validate(row)`."""

    model_config = ConfigDict(from_attributes=True)


class Page(ResponseModel, Generic[T]):
    """A cursor-paged list, newest first."""

    data: list[T]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page.")


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: str
    param: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        None, description="A refused JSONL file's first bad lines: `line`, `message`, `code`."
    )
    error_count: int | None = Field(None, description="How many lines of the file are bad.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed request",
        401: "Missing or invalid API key",
        403: "The key may not do this",
        404: "Not found",
        409: "Conflict",
        413: "Body too large",
        422: "Invalid field (named in `param`)",
        503: "A dependency is unavailable",
    }.items()
}
RATE_LIMITED_DOC: dict[int | str, dict[str, object]] = {
    429: {"model": ErrorResponse, "description": "Rate limited; retry after `Retry-After` s"}
}
