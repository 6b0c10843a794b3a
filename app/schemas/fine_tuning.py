"""OpenAI's fine-tuning shapes (`/v1/fine_tuning/jobs`): the create request, a job, its events and
checkpoints, and their cursor-paged lists. Field names and types follow the official `openai`
package's `types/fine_tuning`."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.common import StrictModel

T = TypeVar("T")
FineTuningStatus = Literal[
    "validating_files", "queued", "running", "succeeded", "failed", "cancelled"
]
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's limits
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(max_length=METADATA_KEY_CHARS)],
        Annotated[str, Field(max_length=METADATA_VALUE_CHARS)],
    ],
    Field(max_length=METADATA_PAIRS),
]


class MethodOptions(StrictModel):
    """`method.<type>`: only its hyperparameters."""

    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="`beta`, `learning_rate_multiplier`, `n_epochs`, `batch_size` (each a value "
        'or `"auto"`); `bapo` also `anchor_weight`.',
    )


class MethodIn(StrictModel):
    """OpenAI's `method`: `{"type": "dpo", "dpo": {"hyperparameters": {...}}}`."""

    type: str = Field(max_length=32, description="`bapo` or `dpo` (this service trains on pairs).")
    dpo: MethodOptions | None = None
    bapo: MethodOptions | None = None
    supervised: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobIn(StrictModel):
    """`POST /v1/fine_tuning/jobs`: train a new adapter version for the user named by `model`."""

    model: str = Field(max_length=80, description="`user:<id>`, the user to train.")
    training_file: str | None = Field(
        None,
        max_length=64,
        description="A `file-…` id (`POST /v1/files`): its pairs are imported into the user's "
        "feedback (once per file content) first; omitted: train on the pairs already stored.",
    )
    validation_file: str | None = Field(None, max_length=64, description="Not supported.")
    method: MethodIn | None = Field(None, description="Omitted: the server's default method.")
    hyperparameters: dict[str, Any] | None = Field(
        None, description="OpenAI's deprecated top-level form: refused, use `method`."
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="The training seed.")
    suffix: str | None = Field(
        None, max_length=64, description="Refused unless null: models are named `user:<id>:v<N>`."
    )
    metadata: Metadata | None = Field(None, description="Up to 16 string pairs kept on the job.")
    integrations: list[dict[str, Any]] | None = Field(None, description="Not supported.")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """A training job as OpenAI's `fine_tuning.job` (the same job as `/users/{id}/train/jobs`)."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str = Field(description="The job id, the same in `/users/{id}/train/jobs/{job_id}`.")
    model: str = Field(description="`user:<id>`.")
    created_at: int
    finished_at: int | None
    estimated_finish: int | None = Field(description="While running: from the step progress.")
    status: FineTuningStatus
    fine_tuned_model: str | None = Field(description="`user:<id>:v<N>` once published.")
    error: JobError | None
    trained_tokens: int | None = Field(description="Tokens the training steps forwarded.")
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    training_file: str | None
    validation_file: None = None
    result_files: list[str] = Field(default_factory=list)
    organization_id: str = Field(description="The user id: a user is this service's tenant.")
    metadata: dict[str, str] | None
    integrations: list[Any] = Field(default_factory=list)


class FineTuningJobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class CheckpointMetrics(BaseModel):
    step: float
    train_loss: float | None = None
    valid_loss: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="`user:<id>:v<N>`: usable as a model.")
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class CursorPage(BaseModel, Generic[T]):
    """OpenAI's list: pass the last item's `id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
