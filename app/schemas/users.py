"""User shapes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas.common import ResponseModel, StrictModel


class UserCreate(StrictModel):
    id: str | None = Field(
        None,
        description="Optional id ([A-Za-z0-9_.-]{1,64}); generated when absent.",
        examples=["alice"],
    )


class UserCreated(BaseModel):
    id: str
    api_key: str = Field(description="Shown once; only its hash is stored.")
    created_at: datetime


class UserOut(ResponseModel):
    id: str
    created_at: datetime
    pair_count: int
    active_adapter_version: int | None
