"""OpenAI's fine-tuning jobs API mapped onto the training jobs of app.services.jobs.

Nothing here runs or stores a job itself: a `fine_tuning.job` is a training job seen in OpenAI's
shape. This module translates the request (`model: "user:<id>"`, `method.<type>.hyperparameters`
with OpenAI's names) into `start_job`'s arguments, its errors into 400s naming OpenAI's fields,
and jobs, events and the published version into OpenAI's objects. Nothing here commits.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, cast

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import BadRequest, Conflict, InvalidRequest, NotFound
from app.core.security import Principal
from app.models import JobEvent, TrainingJob, utcnow
from app.schemas.fine_tuning import (
    METADATA_KEY_CHARS,
    METADATA_PAIRS,
    METADATA_VALUE_CHARS,
    CheckpointMetrics,
    CursorPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    FineTuningJobIn,
    FineTuningStatus,
    JobError,
    MethodIn,
)
from app.services import adapters as adapter_service
from app.services import jobs as job_service
from app.services.generate import MODEL_PREFIX, parse_model_id
from app.services.imports import import_file
from app.services.pagination import RowPage

METHODS = ("bapo", "dpo")
# OpenAI's hyperparameter names → TrainConfig fields that mean the same thing
# (learning_rate_multiplier scales the server's default learning_rate instead).
ENGINE_NAMES = {"beta": "beta", "n_epochs": "epochs", "batch_size": "batch_size"}
SUPPORTED = {
    "dpo": ("batch_size", "beta", "learning_rate_multiplier", "n_epochs"),
    "bapo": ("anchor_weight", "batch_size", "beta", "learning_rate_multiplier", "n_epochs"),
}
Level = Literal["info", "warn", "error"]


# --- creating a job -------------------------------------------------------------------------------


def create_job(
    session: Session,
    settings: Settings,
    principal: Principal,
    body: FineTuningJobIn,
    request_id: str | None = None,
) -> TrainingJob:
    """A new queued job for the user `body.model` names; 409 if they already have one.

    With a `training_file`, its pairs are first imported into the user's feedback (once per file
    content); the job trains on all the user's pairs, as every job does. A refusal after the
    import rolls it back with the request's transaction.
    """
    user_id = _model_user(body.model)
    principal.authorize_user(user_id)
    _refuse_unsupported(body)
    method = body.method.type if body.method else None
    hyperparameters = _engine_hyperparameters(settings, body.method)
    if body.seed is not None:
        hyperparameters["seed"] = body.seed
    try:
        job_service.resolve_hyperparameters(settings, method, hyperparameters)  # before importing
        if body.training_file is not None:
            _refuse_if_active(session, user_id)
            import_file(session, user_id, body.training_file, principal, settings)
        job, created = job_service.start_job(
            session,
            settings,
            user_id,
            method=method,
            hyperparameters=hyperparameters,
            trigger="api",
            request_id=request_id,
            metadata=body.metadata,
            training_file=body.training_file,
        )
    except BadRequest:
        raise  # already OpenAI's status (a file's bad lines, say)
    except InvalidRequest as exc:
        raise _as_bad_request(exc, method or "bapo") from exc
    if not created:
        raise _already_active(job)
    return job


def _refuse_if_active(session: Session, user_id: str) -> None:
    """409 before anything is imported when the user already has a queued/running job."""
    active = job_service.active_job(session, user_id)
    if active is not None:
        raise _already_active(active)


def _already_active(job: TrainingJob) -> Conflict:
    return Conflict(
        f"User {job.user_id!r} already has a {job.status} training job ({job.id}); "
        "one job per user at a time: cancel it or wait for it to finish",
        "job_already_active",
    )


def _model_user(model: str) -> str:
    """The user id of `user:<id>`: a job always trains a new version on the base model."""
    user_id, selector = parse_model_id(model)
    if selector != adapter_service.ACTIVE:
        raise BadRequest(
            f"model: fine-tune {MODEL_PREFIX}{user_id!s}: a job trains a new version from the base "
            "model, not from a version",
            "invalid_model",
            param="model",
        )
    return user_id


def _refuse_unsupported(body: FineTuningJobIn) -> None:
    """400 naming the first field of OpenAI's request this service cannot honour."""
    refused = {
        "validation_file": (
            body.validation_file,
            "not supported: a job holds out part of the user's pairs itself",
        ),
        "suffix": (body.suffix, "not supported: fine-tuned models are named user:<id>:v<N>"),
        "hyperparameters": (
            body.hyperparameters,
            "not supported (deprecated by OpenAI): use method.<type>.hyperparameters",
        ),
        "integrations": (body.integrations or None, "not supported"),
    }
    for param, (value, why) in refused.items():
        if value is not None:
            raise BadRequest(f"{param}: {why}", "unsupported_parameter", param=param)


def _engine_hyperparameters(settings: Settings, method: MethodIn | None) -> dict[str, Any]:
    """TrainConfig overrides from `method.<type>.hyperparameters` ("auto": the server default)."""
    if method is None:
        return {}
    given = _method_options(method)
    overrides: dict[str, Any] = {}
    for name, value in given.items():
        param = f"method.{method.type}.hyperparameters.{name}"
        if name not in SUPPORTED[method.type]:
            supported = ", ".join(SUPPORTED[method.type])
            raise BadRequest(
                f"{param}: not supported; {method.type} takes {supported}",
                "unsupported_hyperparameter",
                param=param,
            )
        if value == "auto":
            continue
        if name == "learning_rate_multiplier":
            overrides["learning_rate"] = _multiplier(value, param) * default_learning_rate(settings)
        else:
            overrides[ENGINE_NAMES.get(name, name)] = value
    return overrides


def _method_options(method: MethodIn) -> dict[str, Any]:
    """The hyperparameters of `method.<type>`, after checking the type and its options."""
    if method.type not in METHODS:
        raise BadRequest(
            f"method.type: {method.type!r} is not supported; this service trains on preference "
            "pairs: 'bapo' or 'dpo'",
            "unsupported_method",
            param="method.type",
        )
    for other in ("dpo", "bapo", "supervised", "reinforcement"):
        if other != method.type and getattr(method, other) is not None:
            raise BadRequest(
                f"method.{other}: given, but method.type is {method.type!r}",
                "invalid_method",
                param=f"method.{other}",
            )
    options = getattr(method, method.type)
    return dict(options.hyperparameters or {}) if options is not None else {}


def _multiplier(value: Any, param: str) -> float:
    """A learning-rate multiplier: a finite number > 0."""
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise BadRequest(
            f'{param}: must be a number > 0 or "auto"', "invalid_hyperparameters", param=param
        )
    return float(number)


def default_learning_rate(settings: Settings) -> float:
    """The learning rate a job gets unless it asks otherwise (TRAIN_DEFAULTS or the engine's)."""
    return float(job_service.resolve_hyperparameters(settings, None, None)["learning_rate"])


def _as_bad_request(exc: InvalidRequest, method: str) -> BadRequest:
    """start_job's refusal as OpenAI's 400, naming the request's field instead of the engine's."""
    param = exc.param
    message = exc.message
    engine = (param or "").removeprefix("hyperparameters.")
    if param and param.startswith("hyperparameters.") and engine != param:
        openai = {v: k for k, v in ENGINE_NAMES.items()}
        openai |= {"learning_rate": "learning_rate_multiplier", "anchor_weight": "anchor_weight"}
        new = (
            "seed"
            if engine == "seed"
            else f"method.{method}.hyperparameters.{openai.get(engine, engine)}"
        )
        message = new + message[len(param) :] if message.startswith(param) else message
        param = new
    return BadRequest(message, exc.code, param=param)


# --- reading and cancelling -----------------------------------------------------------------------


def owned_job(session: Session, principal: Principal, job_id: str) -> TrainingJob:
    """The job, if the key may see it: 404 when unknown, 403 when it is another user's."""
    job = job_service.find_job(session, job_id)
    principal.authorize_user(job.user_id)
    return job


def list_jobs(
    session: Session,
    principal: Principal,
    limit: int,
    after: str | None,
    metadata: dict[str, str] | None = None,
) -> RowPage[TrainingJob]:
    """The caller's jobs (the operator: everyone's), newest first, after the job id `after`,
    those whose metadata holds every pair of `metadata` ({}: those without metadata)."""
    user_id = None if principal.is_operator else principal.user_id
    return job_service.list_jobs(session, user_id, limit, after, metadata)


METADATA_PARAM = re.compile(r"^metadata\[(.+)\]$")


def metadata_filter(params: list[tuple[str, str]]) -> dict[str, str] | None:
    """OpenAI's list filter as {k: v}: `metadata[k]=v` pairs (each must match), or `metadata=null`
    as {} (jobs without metadata); None: no filter. The limits of a job's metadata (16 pairs,
    keys of 64 characters, values of 512); a key given twice, or both forms, is a 400."""
    wanted: dict[str, str] = {}
    only_null = False
    for name, value in params:
        match = METADATA_PARAM.match(name)
        if match is None:
            if name == "metadata" and value != "null":
                raise _bad_metadata("metadata: metadata=null, or metadata[key]=value pairs")
            only_null = only_null or name == "metadata"
            continue
        key = match.group(1)
        if key in wanted or len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
            raise _bad_metadata(
                f"metadata[{key[:64]}]: one value per key, keys of at most 64 characters and "
                "values of at most 512"
            )
        wanted[key] = value
    if len(wanted) > METADATA_PAIRS or (only_null and wanted):
        raise _bad_metadata("metadata: at most 16 pairs, and not together with metadata=null")
    return {} if only_null else wanted or None


def _bad_metadata(message: str) -> BadRequest:
    return BadRequest(message, "invalid_metadata", param="metadata")


def cancel_job(session: Session, principal: Principal, job_id: str) -> TrainingJob:
    """Cancel the job (a running one stops between two steps); 409 once it has finished."""
    job = owned_job(session, principal, job_id)
    return job_service.cancel_job(session, job.user_id, job_id)


def list_events(
    session: Session, principal: Principal, job_id: str, limit: int, after: str | None
) -> CursorPage[FineTuningJobEvent]:
    """The job's events as `fine_tuning.job.event`s, newest first (OpenAI's order)."""
    job = owned_job(session, principal, job_id)
    page = job_service.list_events(
        session, job.user_id, job_id, limit, _event_id(after), newest_first=True
    )
    return CursorPage(data=[event_object(e) for e in page.data], has_more=page.has_more)


def _event_id(after: str | None) -> int | None:
    """`after` as an event id (ids are decimal strings)."""
    if after is None:
        return None
    if not after.isdigit() or len(after) > 18:
        raise BadRequest("after: not an event id of this job", "invalid_cursor", param="after")
    return int(after)


def list_checkpoints(
    session: Session, principal: Principal, job_id: str, after: str | None
) -> CursorPage[FineTuningJobCheckpoint]:
    """The version the job published, as its one checkpoint (none before, or once deleted)."""
    job = owned_job(session, principal, job_id)
    checkpoints = [] if job.adapter_version is None else _checkpoint(session, job)
    if after is not None:
        if after not in {c.id for c in checkpoints}:
            raise BadRequest("after: not a checkpoint of this job", "invalid_cursor", param="after")
        checkpoints = []
    return CursorPage(data=checkpoints, has_more=False)


def _checkpoint(session: Session, job: TrainingJob) -> list[FineTuningJobCheckpoint]:
    """[the checkpoint of the job's published version] ([] if that version is gone)."""
    assert job.adapter_version is not None
    try:
        adapter = adapter_service.get_adapter(session, job.user_id, job.adapter_version)
    except NotFound:
        return []
    metrics = job.metrics or {}
    steps = int(metrics.get("steps") or 0)
    return [
        FineTuningJobCheckpoint(
            id=f"ftckpt-{job.id}-v{adapter.version}",
            created_at=_unix(adapter.created_at),
            fine_tuned_model_checkpoint=f"{MODEL_PREFIX}{job.user_id}:v{adapter.version}",
            fine_tuning_job_id=job.id,
            step_number=steps,
            metrics=CheckpointMetrics(
                step=steps,
                train_loss=metrics.get("train_loss"),
                valid_loss=metrics.get("heldout_loss"),
            ),
        )
    ]


# --- OpenAI's objects -----------------------------------------------------------------------------


def job_objects(settings: Settings, page: RowPage[TrainingJob]) -> CursorPage[FineTuningJob]:
    """A page of jobs as OpenAI's list."""
    base_lr = default_learning_rate(settings)
    return CursorPage(data=[job_object(job, base_lr) for job in page.data], has_more=page.has_more)


def job_object(job: TrainingJob, base_lr: float) -> FineTuningJob:
    """The job as a `fine_tuning.job`; `base_lr` is what learning_rate_multiplier 1 means."""
    hp = job.hyperparameters
    common = {
        "batch_size": hp.get("batch_size"),
        "learning_rate_multiplier": float(f"{hp.get('learning_rate', base_lr) / base_lr:.10g}"),
        "n_epochs": hp.get("epochs"),
    }
    options = {**common, "beta": hp.get("beta")}
    if job.method == "bapo":
        options["anchor_weight"] = hp.get("anchor_weight")
    tokens = (job.metrics or {}).get("tokens_trained")
    return FineTuningJob(
        id=job.id,
        model=f"{MODEL_PREFIX}{job.user_id}",
        created_at=_unix(job.created_at),
        finished_at=_unix(job.finished_at) if job.finished_at else None,
        estimated_finish=_estimated_finish(job),
        status=cast(FineTuningStatus, job.status),  # ours are a subset of OpenAI's values
        fine_tuned_model=(
            f"{MODEL_PREFIX}{job.user_id}:v{job.adapter_version}"
            if job.adapter_version is not None
            else None
        ),
        error=_job_error(job),
        trained_tokens=tokens if isinstance(tokens, int) else None,
        hyperparameters=common,
        method={"type": job.method, job.method: {"hyperparameters": options}},
        seed=int(hp.get("seed", 0)),
        training_file=job.training_file,
        organization_id=job.user_id,
        metadata=job.meta,
    )


def _job_error(job: TrainingJob) -> JobError | None:
    """A failed job's error as OpenAI's `{code, message, param}`."""
    if job.status != "failed":
        return None
    return JobError(code="training_failed", message=job.error or "training failed", param=None)


def _estimated_finish(job: TrainingJob) -> int | None:
    """While running: the start plus the elapsed time over the fraction of steps done."""
    if job.status != "running" or job.started_at is None or not 0 < job.progress < 1:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    return _unix(job.started_at) + int(elapsed / job.progress)


def event_object(event: JobEvent) -> FineTuningJobEvent:
    """One job event as a `fine_tuning.job.event`: steps are `metrics`, the rest `message`."""
    data = dict(event.data or {})
    level: Level = "info"
    kind: Literal["message", "metrics"] = "message"
    if event.kind == "step":
        kind, loss = "metrics", data.get("loss")
        data = {"step": event.step, "train_loss": loss, **data}
        message = f"Step {event.step}: training loss={loss:.4f}" if loss is not None else ""
    elif event.kind == "phase":
        message = f"Phase: {data.get('phase')}"
    elif event.kind == "gate":
        passed = bool(data.get("passed"))
        level = "info" if passed else "warn"
        message = (
            "Retention gate passed"
            if passed
            else f"Retention gate failed ({data.get('reason')}): the version is kept, not activated"
        )
    else:
        status = data.get("status")
        level = _status_level(status, data)
        message = str(data.get("message") or f"Job {status}")
    return FineTuningJobEvent(
        id=str(event.id),
        created_at=_unix(event.created_at),
        level=level,
        message=message or f"Step {event.step}",
        type=kind,
        data=data,
    )


def _status_level(status: Any, data: dict[str, Any]) -> Level:
    """error for a failure, warn for a job sent back to the queue, else info."""
    if status == "failed":
        return "error"
    return "warn" if status == "queued" and "trigger" not in data else "info"


def _unix(moment: Any) -> int:
    return int(moment.timestamp())
