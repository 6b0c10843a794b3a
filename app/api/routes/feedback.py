"""Preference feedback: store (idempotent), page through, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.deps import (
    LimitDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    UserIdDep,
    commit_now,
)
from app.api.state import AppState, StateDep
from app.core.errors import BadRequest, UnsupportedMediaType
from app.schemas.common import ERROR_RESPONSES, ErrorResponse, Page
from app.schemas.feedback import FeedbackCreated, FeedbackIn, PairOut
from app.schemas.files import ImportReportOut
from app.services import feedback as feedback_service
from app.services import users as user_service
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


@router.post("", status_code=201, response_model=FeedbackCreated, summary="Store preference pairs")
def post_feedback(
    state: StateDep,
    user_id: UserIdDep,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    body: Annotated[FeedbackIn, Body(openapi_examples=FEEDBACK_EXAMPLES)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> Any:
    """Store one pair or a batch; committed before the 201. A retried Idempotency-Key replays."""
    user_service.require_user(session, user_id, principal)
    pairs = feedback_service.normalize(body, settings)
    result = feedback_service.store_pairs(session, user_id, pairs, idempotency_key)
    commit_now(session)
    headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
    if not result.replayed:
        state.metrics.pairs_stored.inc(len(pairs))
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


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
