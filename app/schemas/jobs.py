"""Training-job shapes: the train request, a job, its events."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from app.schemas.common import ResponseModel, StrictModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TrainRequest(StrictModel):
    """Start a training job for the user (everything optional)."""

    method: Literal["bapo", "dpo"] | None = Field(
        None, description="`bapo` (default) or the `dpo` baseline (anchor weight 0)."
    )
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description=(
            "Overrides of the training hyperparameters, e.g. `beta`, `anchor_weight`, "
            "`anchor_form` (hinge|hinge_per_token|hinge_tolerance|replay|sigmoid), "
            "`anchor_tolerance`, `learning_rate`, `epochs`, `max_steps`, `batch_size`, "
            "`lora_rank` (1, 8, 16, 32, 64, ...), `lora_alpha`, `lora_dropout`, `seed`, "
            "`max_prompt_tokens`, `max_response_tokens`, `base_max_new_tokens`. Unknown keys are "
            "refused; the job shows every resolved value."
        ),
    )


class GateOut(ResponseModel):
    """The retention gate's verdict on an adapter and the figures it was judged on (the figures
    are None for adapters gated before they were recorded)."""

    passed: bool
    reason: str | None = Field(None, description="Why the adapter was not activated.")
    retention_delta: float | None = Field(
        None, description="Adapter minus base MC accuracy on the same questions."
    )
    anchor_logratio: float | None = Field(None, description="Mean log-ratio on base responses.")
    retention_stderr: float | None = Field(
        None,
        description="Paired standard error of `retention_delta` (sd of the per-question "
        "differences / √n).",
    )
    retention_threshold: float | None = Field(
        None,
        description="The knowledge check fails below this: min(−z·stderr, "
        "GATE_MIN_RETENTION_DELTA).",
    )
    retention_z: float | None = Field(None, description="GATE_RETENTION_Z it was judged with.")
    mc_questions: int | None = Field(None, description="Questions in the MC comparison.")
    base_accuracy: float | None = Field(None, description="Base model's MC accuracy.")
    adapter_accuracy: float | None = Field(None, description="Adapter's MC accuracy.")
    degenerate_fraction: float | None = Field(
        None,
        description="Share of the adapter's answers to the general prompts that are "
        "degenerate (empty, repetitive or far less likely under the base than its own answers).",
    )
    base_degenerate_fraction: float | None = Field(
        None, description="The same share for the base model's answers."
    )
    max_degenerate_fraction: float | None = Field(
        None, description="The adapter fails above this share: base + GATE_MAX_DEGENERATE_INCREASE."
    )
    gate_prompts: int | None = Field(None, description="General prompts judged.")


class JobOut(ResponseModel):
    """A training job (status values as OpenAI's fine-tuning jobs)."""

    object: Literal["training_job"] = "training_job"
    id: str
    user_id: str
    status: JobStatus
    method: str
    trigger: str = Field(description="`api` (POST .../train) or `schedule` (periodic retraining).")
    hyperparameters: dict[str, Any]
    pair_count: int = Field(description="Pairs the job trains on (those up to `last_pair_id`).")
    last_pair_id: int | None
    phase: str | None = Field(None, description="What a running job is doing now.")
    progress: float = Field(description="Fraction of training steps done, 0..1.")
    attempts: int = Field(description="How many times a worker claimed the job.")
    cancel_requested: bool
    error: str | None
    metrics: dict[str, Any] | None = Field(None, description="Final metrics of a finished job.")
    gate: GateOut | None = None
    adapter_version: int | None = Field(None, description="The version this job published.")
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None = Field(None, description="finished_at (or now) minus started_at.")

    @field_validator("metrics", mode="before")
    @classmethod
    def _none_when_empty(cls, value: Any) -> Any:
        """A job without final metrics shows None, not {}."""
        return value or None


class JobEventOut(ResponseModel):
    """One event of a job: a training step's metrics, a phase change, a status change."""

    id: int
    job_id: str
    kind: Literal["step", "phase", "status", "gate"]
    step: int | None
    data: dict[str, Any]
    created_at: datetime


class JobPage(ResponseModel):
    """Jobs, newest first."""

    data: list[JobOut]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page.")


class JobEventPage(ResponseModel):
    """Events, oldest first; poll with `after` = the last id you saw (`next_cursor`)."""

    data: list[JobEventOut]
    has_more: bool
    next_cursor: str | None = Field(None, description="Pass as `after` for the next page.")
