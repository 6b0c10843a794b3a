"""OpenAI's fine-tuning jobs API (`/v1/fine_tuning/jobs`) over the same training jobs as
`/users/{id}/train`: the model `user:<id>` names the user to train."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request

from app.api.deps import LimitDep, PrincipalDep, SessionDep, SettingsDep, rate_limit
from app.core.middleware import request_id_var
from app.schemas.common import ERROR_RESPONSES, RATE_LIMITED_DOC
from app.schemas.fine_tuning import (
    CursorPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    FineTuningJobIn,
)
from app.services import fine_tuning as service

router = APIRouter(prefix="/v1/fine_tuning", tags=["openai"], responses=ERROR_RESPONSES)

JobIdPath = Annotated[str, Path(max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]
AfterQuery = Annotated[
    str | None, Query(max_length=64, description="The last `id` of the previous page.")
]
CREATE_EXAMPLES: dict[str, Any] = {
    "dpo": {
        "summary": "DPO on the user's stored pairs",
        "value": {
            "model": "user:alice",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2}}},
        },
    },
}


@router.post(
    "/jobs",
    response_model=FineTuningJob,
    summary="Create a fine-tuning job (OpenAI-compatible)",
    responses=RATE_LIMITED_DOC,
    dependencies=[Depends(rate_limit("train"))],
)
def create_job(
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[FineTuningJobIn, Body(openapi_examples=CREATE_EXAMPLES)],
) -> FineTuningJob:
    """A queued training job for `user:<id>` (enqueued after commit); 409 if one is active."""
    job = service.create_job(session, settings, principal, body, request_id_var.get())
    return service.job_object(job, service.default_learning_rate(settings))


@router.get("/jobs", response_model=CursorPage[FineTuningJob], summary="List fine-tuning jobs")
def list_jobs(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: LimitDep,
    after: AfterQuery = None,
) -> CursorPage[FineTuningJob]:
    """The key's jobs (the operator: every user's), newest first; `metadata[k]=v` keeps the jobs
    whose metadata has k = v (each pair given must match), as OpenAI's list filters."""
    wanted = service.metadata_filter(request.query_params.multi_items())
    page = service.list_jobs(session, principal, limit, after, wanted)
    return service.job_objects(settings, page)


@router.get("/jobs/{job_id}", response_model=FineTuningJob, summary="Retrieve a fine-tuning job")
def retrieve_job(
    principal: PrincipalDep, session: SessionDep, settings: SettingsDep, job_id: JobIdPath
) -> FineTuningJob:
    """The job; `fine_tuned_model` (`user:<id>:v<N>`) once its version is published."""
    job = service.owned_job(session, principal, job_id)
    return service.job_object(job, service.default_learning_rate(settings))


@router.post(
    "/jobs/{job_id}/cancel", response_model=FineTuningJob, summary="Cancel a fine-tuning job"
)
def cancel_job(
    principal: PrincipalDep, session: SessionDep, settings: SettingsDep, job_id: JobIdPath
) -> FineTuningJob:
    """Queued: cancelled now. Running: stops between two steps. Finished: 409."""
    job = service.cancel_job(session, principal, job_id)
    return service.job_object(job, service.default_learning_rate(settings))


@router.get(
    "/jobs/{job_id}/events",
    response_model=CursorPage[FineTuningJobEvent],
    summary="A fine-tuning job's events, newest first",
)
def list_events(
    principal: PrincipalDep,
    session: SessionDep,
    job_id: JobIdPath,
    limit: LimitDep,
    after: AfterQuery = None,
) -> CursorPage[FineTuningJobEvent]:
    """Step metrics (`type: metrics`) and lifecycle messages; `after` pages to older ones."""
    return service.list_events(session, principal, job_id, limit, after)


@router.get(
    "/jobs/{job_id}/checkpoints",
    response_model=CursorPage[FineTuningJobCheckpoint],
    summary="A fine-tuning job's checkpoints",
)
def list_checkpoints(
    principal: PrincipalDep,
    session: SessionDep,
    job_id: JobIdPath,
    limit: LimitDep,
    after: AfterQuery = None,
) -> CursorPage[FineTuningJobCheckpoint]:
    """The adapter version the job published (usable as a model), once it is published."""
    del limit  # a job publishes at most one version
    return service.list_checkpoints(session, principal, job_id, after)
