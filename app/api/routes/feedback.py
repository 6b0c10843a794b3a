"""Preference feedback: store (idempotent), page through, delete."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.deps import (
    BearerDep,
    LimitDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    UserIdDep,
    get_principal,
)
from app.api.state import AppState, StateDep
from app.core.db import transaction
from app.core.errors import BadRequest, UnsupportedMediaType
from app.core.security import validate_user_id
from app.schemas.common import ERROR_RESPONSES, ErrorResponse, Page
from app.schemas.feedback import FeedbackCreated, FeedbackIn, PairOut
from app.schemas.files import ImportReportOut
from app.services import feedback as feedback_service
from app.services import users as user_service
from app.services.feedback import StoredResult
from app.services.imports import ImportReport, PairImport, import_file

router = APIRouter(prefix="/users/{user_id}/feedback", tags=["feedback"], responses=ERROR_RESPONSES)

FEEDBACK_EXAMPLES: dict[str, Any] = {
    "pair": {
        "summary": "One pair",
        "value": {
            "prompt": "Explain recursion.",
            "chosen": "A function calling itself...",
            "rejected": "Recursion is recursion.",
        },
    },
    "batch": {
        "summary": "A batch",
        "value": {
            "pairs": [
                {
                    "messages": [{"role": "user", "content": "Hi"}],
                    "chosen": "Hello!",
                    "rejected": "What.",
                }
            ]
        },
    },
    "openai": {
        "summary": "OpenAI/Together preference shape",
        "value": {
            "input": {"messages": [{"role": "user", "content": "Hi"}]},
            "preferred_output": [{"role": "assistant", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "What."}],
        },
    },
}


FEEDBACK_BODY: TypeAdapter[Any] = TypeAdapter(FeedbackIn)
_BODY_SCHEMA = FEEDBACK_BODY.json_schema(ref_template="#/components/schemas/{model}")
# The models the body refers to, for the OpenAPI document's components (see app.main).
OPENAPI_SCHEMAS: dict[str, Any] = _BODY_SCHEMA.pop("$defs")
POST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _BODY_SCHEMA, "examples": FEEDBACK_EXAMPLES}},
    }
}


@router.post(
    "",
    status_code=201,
    response_model=FeedbackCreated,
    responses={415: {"model": ErrorResponse, "description": "The body is not declared JSON"}},
    openapi_extra=POST_BODY,
    summary="Store preference pairs",
)
async def post_feedback(
    request: Request,
    state: StateDep,
    user_id: Annotated[str, Path(description="User id ([A-Za-z0-9_.-]{1,64}).", max_length=64)],
    credentials: BearerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> Any:
    """Store one pair or a batch; committed before the 201. A retried Idempotency-Key replays.

    Ingestion's hot path: the key check, the body, the inserts and the commit run in one worker
    thread and one transaction (the other routes' sync dependencies cost a thread hop each).
    The key is checked first (401/403), then the body (415, 400, 422), as for the other routes.
    """
    raw = await request.body()
    content_type = request.headers.get("content-type")
    result, stored = await run_in_threadpool(
        _store_feedback, state, user_id, credentials, content_type, raw, idempotency_key
    )
    headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
    if not result.replayed:
        state.metrics.pairs_stored.inc(stored)
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


def _store_feedback(
    state: AppState,
    user_id: str,
    credentials: HTTPAuthorizationCredentials | None,
    content_type: str | None,
    raw: bytes,
    idempotency_key: str | None,
) -> tuple[StoredResult, int]:
    """Authorize, validate and store, committed on return: (the result, the pairs it stored)."""
    with transaction(state.session_factory) as session:
        principal = get_principal(state, session, credentials)
        validate_user_id(user_id)
        principal.authorize_user(user_id)
        _require_json(content_type)
        body = _parse_body(raw)
        user_service.require_user(session, user_id, principal)
        pairs = feedback_service.normalize(body, state.settings)
        return feedback_service.store_pairs(session, user_id, pairs, idempotency_key), len(pairs)


def _parse_body(raw: bytes) -> Any:
    """The body as one of the feedback shapes, read as FastAPI reads a body (the standard
    library's JSON, so an escaped lone surrogate reaches the text check): 400 if it is not
    JSON, 422 naming the field otherwise."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8/16/32, or nested too deep
        error = {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                 "input": {}, "ctx": {"error": str(exc)}}  # fmt: skip
        raise RequestValidationError([error], body=raw) from None
    try:
        return FEEDBACK_BODY.validate_python(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in errors], body=document
        ) from None


def _require_json(content_type: str | None) -> None:
    """415 unless the body is declared JSON (as FastAPI reads it: no type at all is JSON too)."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            "Content-Type: send the pairs as application/json (a JSONL file goes to "
            "POST /users/{user_id}/feedback/import)",
            param="Content-Type",
        )


@router.get("", response_model=Page[PairOut], summary="List pairs, newest first")
def list_feedback(
    user_id: UserIdDep,
    session: SessionDep,
    limit: LimitDep,
    cursor: Annotated[str | None, Query(max_length=32, description="From `next_cursor`.")] = None,
) -> Page[PairOut]:
    """Cursor-paged pairs, newest first."""
    user_service.get_user(session, user_id)
    page = feedback_service.list_pairs(session, user_id, limit, cursor)
    return Page[PairOut].model_validate(page)


@router.delete("/{pair_id}", status_code=204, summary="Delete a pair")
def delete_feedback(
    user_id: UserIdDep, session: SessionDep, pair_id: Annotated[int, Path(ge=1, le=2**62)]
) -> Response:
    """Delete one pair of this user."""
    user_service.get_user(session, user_id)
    feedback_service.delete_pair(session, user_id, pair_id)
    return Response(status_code=204)


JSONL_TYPES = (
    "application/jsonl",
    "application/x-ndjson",
    "application/x-jsonlines",
    "application/jsonlines",
    "application/json-lines",
    "text/jsonl",
)
IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The JSONL file itself, one pair a line (any shape `POST` feedback takes, "
        "and TRL's preference formats).",
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in JSONL_TYPES},
    }
}


@router.post(
    "/import",
    status_code=201,
    response_model=ImportReportOut,
    responses={
        200: {"model": ImportReportOut, "description": "This file was imported before"},
        415: {"model": ErrorResponse, "description": "The body is not declared JSONL"},
    },
    openapi_extra=IMPORT_BODY,
    summary="Import a JSONL file of pairs",
)
async def import_feedback(
    request: Request,
    state: StateDep,
    user_id: UserIdDep,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    file_id: Annotated[
        str | None, Query(max_length=64, description="Import this `/v1/files` file instead.")
    ] = None,
) -> Any:
    """Stream a JSONL body into the user's pairs: all lines or none (400 lists the bad lines by
    number); the same file content again stores nothing (200, `already_imported`)."""
    if file_id is not None:
        stored = await run_in_threadpool(
            import_file, session, user_id, file_id, principal, settings
        )
        return _report_response(state, stored)
    _require_jsonl(request.headers.get("content-type", ""))
    await run_in_threadpool(user_service.get_user, session, user_id)
    job = await run_in_threadpool(PairImport, session, user_id, settings)
    try:
        async for chunk in request.stream():
            await run_in_threadpool(job.feed, chunk)
    except ClientDisconnect as exc:  # gone, or cut off at MAX_UPLOAD_BYTES (already answered)
        await run_in_threadpool(job.abort)
        raise BadRequest("body: the upload ended early", "upload_incomplete") from exc
    return _report_response(state, await run_in_threadpool(job.finish))


def _report_response(state: AppState, report: ImportReport) -> JSONResponse:
    state.metrics.pairs_stored.inc(report.created)
    status = 200 if report.already_imported else 201
    return JSONResponse(report.to_dict(), status_code=status)


def _require_jsonl(content_type: str) -> None:
    """415 unless the body is declared JSONL (multipart belongs to `POST /v1/files`)."""
    if content_type.split(";")[0].strip().lower() not in JSONL_TYPES:
        raise UnsupportedMediaType(
            "Content-Type: send the JSONL file as the raw body with Content-Type "
            "application/jsonl (or application/x-ndjson); to upload a multipart form, use "
            "POST /v1/files and import it by id",
            param="Content-Type",
        )
