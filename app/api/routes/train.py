"""Training jobs: start one, list them, read one, its events, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from fastapi.responses import JSONResponse

from app.api.deps import LimitDep, SessionDep, SettingsDep, UserIdDep, rate_limit
from app.core.middleware import request_id_var
from app.schemas.common import ERROR_RESPONSES, RATE_LIMITED_DOC
from app.schemas.jobs import JobEventPage, JobOut, JobPage, TrainRequest
from app.services import jobs as job_service
from app.services import users as user_service

router = APIRouter(prefix="/users/{user_id}/train", tags=["training"], responses=ERROR_RESPONSES)

JobIdPath = Annotated[str, Path(max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]
TRAIN_EXAMPLES: dict[str, Any] = {
    "default": {"summary": "Defaults (BAPO)", "value": {}},
    "tuned": {
        "summary": "DPO baseline, a short run",
        "value": {
            "method": "dpo",
            "hyperparameters": {"epochs": 1, "learning_rate": 1e-4, "lora_rank": 8},
        },
    },
}


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Start a training job",
    responses={
        200: {"model": JobOut, "description": "The user's queued/running job (no new one)"},
        **RATE_LIMITED_DOC,
    },
    dependencies=[Depends(rate_limit("train"))],
)
def start_training(
    user_id: UserIdDep,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[TrainRequest | None, Body(openapi_examples=TRAIN_EXAMPLES)] = None,
) -> Any:
    """202 with a new queued job (enqueued after commit); 200 with the active one if it exists."""
    body = body or TrainRequest()
    job, created = job_service.start_job(
        session,
        settings,
        user_id,
        method=body.method,
        hyperparameters=body.hyperparameters,
        trigger="api",
        request_id=request_id_var.get(),
    )
    content = JobOut.model_validate(job).model_dump(mode="json")
    headers = {"Location": f"/users/{user_id}/train/jobs/{job.id}"}
    return JSONResponse(content, status_code=202 if created else 200, headers=headers)


@router.get("/jobs", response_model=JobPage, summary="List training jobs, newest first")
def list_jobs(
    user_id: UserIdDep,
    session: SessionDep,
    limit: LimitDep,
    cursor: Annotated[str | None, Query(max_length=40, description="From `next_cursor`.")] = None,
) -> JobPage:
    """Cursor-paged jobs of the user, newest first."""
    user_service.get_user(session, user_id)
    return JobPage.model_validate(job_service.list_jobs(session, user_id, limit, cursor))


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Get a training job")
def get_job(user_id: UserIdDep, job_id: JobIdPath, session: SessionDep) -> JobOut:
    """Status, phase, progress, pair count, hyperparameters, timings, metrics, adapter, error."""
    return JobOut.model_validate(job_service.get_job(session, user_id, job_id))


@router.get("/jobs/{job_id}/events", response_model=JobEventPage, summary="A job's events")
def list_events(
    user_id: UserIdDep,
    job_id: JobIdPath,
    session: SessionDep,
    limit: LimitDep,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Last event id seen.")] = None,
    kind: Annotated[
        str | None,
        Query(max_length=16, description="Only this kind (`step`, `phase`, `status`, `gate`)."),
    ] = None,
) -> JobEventPage:
    """Per-step metrics and lifecycle events, oldest first; poll with `after=next_cursor`."""
    page = job_service.list_events(session, user_id, job_id, limit, after, kind)
    return JobEventPage.model_validate(page)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a training job")
def cancel_job(user_id: UserIdDep, job_id: JobIdPath, session: SessionDep) -> JobOut:
    """Queued: cancelled now. Running: stops between steps, then `cancelled`. Finished: 409."""
    return JobOut.model_validate(job_service.cancel_job(session, user_id, job_id))
