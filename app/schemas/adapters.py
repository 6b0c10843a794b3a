"""Adapter version shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from app.schemas.common import ResponseModel
from app.schemas.jobs import GateOut


class AdapterOut(ResponseModel):
    version: int
    name: str = Field(description="Immutable serving name, `user-<id>-v<N>`.")
    active: bool = Field(description='Served for `adapter: "active"` (the default).')
    available: bool = Field(description="Its files are present, so it can be served.")
    method: str
    job_id: str | None
    metrics: dict[str, Any] | None = Field(description="Evaluation metrics from training.")
    gate_passed: bool = Field(description="Whether it passed the knowledge-retention gate.")
    gate_reason: str | None
    gate: GateOut | None = Field(
        None, description="The gate's verdict with its figures (from `metrics.gate`)."
    )
    created_at: datetime


class AdapterList(ResponseModel):
    data: list[AdapterOut] = Field(description="Newest version first.")
    active_version: int | None = Field(description="None: the base model is served.")
    pinned: bool = Field(
        description="The user chose the active version (or base) explicitly: new versions that "
        "pass the gate are recorded but not activated until the newest version is activated "
        "or `POST .../adapters/unpin`."
    )
